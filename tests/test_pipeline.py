"""`dvc repro` in temporary copies of the project, on synthetic data served through MNIST_MIRROR."""

import json
import math
import shutil

import pandas as pd
import pytest
import torch
from conftest import copy_project, run, set_params, stage_command

N_TEST = 200  # images in the synthetic test split (see write_mirror)


@pytest.fixture(scope="module")
def built(tmp_path_factory, synthetic_mirror, http_root):
    """A copy of the project after `dvc repro` with 3 epochs, downloading over loopback HTTP."""
    directory, checksums = synthetic_mirror
    root, url = http_root
    shutil.copytree(directory, root / "synthetic", dirs_exist_ok=True)
    project = copy_project(tmp_path_factory.mktemp("built"), checksums)
    set_params(project, epochs=3, lr=0.05)
    result = run(project, "dvc", "repro", mirror=f"{url}/synthetic")
    return project, result, f"{url}/synthetic"


def test_repro_runs_every_stage_and_reports_progress(built):
    _, result, url = built
    for stage in ("download", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in result.stdout
    assert f"from {url}/train-images-idx3-ubyte.gz" in result.stdout
    assert "epoch 3/3: loss" in result.stdout
    assert "model.pt: matches the trained model on 200 test images" in result.stdout
    assert "model.pt2: matches the trained model on 200 test images" in result.stdout


def test_repro_writes_metrics_plots_and_models(built):
    project, _, _ = built
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert set(metrics) == {"loss", "accuracy"}
    assert 0.9 < metrics["accuracy"] <= 1.0  # each synthetic class has its own bright patch
    assert 0 < metrics["loss"] < math.log(10)  # better than guessing
    history = pd.read_csv(project / "metrics" / "train_history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    per_class = pd.read_csv(project / "metrics" / "per_class.csv")
    assert per_class["digit"].tolist() == list(range(10))
    predictions = pd.read_csv(project / "metrics" / "predictions.csv")
    assert len(predictions) == N_TEST
    assert (predictions["actual"] == predictions["predicted"]).mean() == metrics["accuracy"]
    assert (project / "models" / "checkpoint.pt").stat().st_size > 0
    assert (project / "models" / "model.pt").stat().st_size > 0
    assert (project / "models" / "model.pt2").stat().st_size > 0
    assert json.loads((project / "models" / "model.json").read_text())["metrics"] == {
        "dataset": "MNIST test set",
        **metrics,
    }
    assert sorted(p.name for p in (project / "data" / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]


def test_second_repro_runs_nothing(built):
    project, _, url = built
    lock = (project / "dvc.lock").read_bytes()
    result = run(project, "dvc", "repro", mirror=url)
    assert "Running stage" not in result.stdout
    assert (project / "dvc.lock").read_bytes() == lock


def test_forced_repro_reproduces_every_output_byte_for_byte(built):
    project, _, url = built
    lock = (project / "dvc.lock").read_bytes()
    outputs = {p: p.read_bytes() for p in [*(project / "metrics").iterdir(), *(project / "models").glob("*.*")]}
    assert {p.name for p in outputs} >= {"eval.json", "checkpoint.pt", "model.pt", "model.pt2", "model.json"}
    result = run(project, "dvc", "repro", "-f", mirror=url)
    assert result.stdout.count("Running stage") == 4
    assert (project / "dvc.lock").read_bytes() == lock
    for path, content in outputs.items():
        assert path.read_bytes() == content, path


def test_plots_are_defined_for_dvc(built):
    project, _, _ = built
    result = run(project, "dvc", "plots", "show", "--json")
    plots = json.loads(result.stdout)["data"]
    titles = {plot[0]["content"]["title"]["text"] for plot in plots.values()}
    assert titles == {
        "Training loss per epoch",
        "Training accuracy per epoch",
        "Test accuracy per digit",
        "Confusion matrix (test set)",
    }


def test_bad_params_fail_with_one_line_and_write_nothing(tmp_path):
    project = copy_project(tmp_path / "project")
    set_params(project, lr=-1)
    result = run(project, *stage_command(project, "train"), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: train.lr must be a positive finite number, got -1"
    ]
    assert not (project / "models" / "checkpoint.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_device_is_a_clear_error(tmp_path):
    project = copy_project(tmp_path / "project")
    set_params(project, device="cuda")
    result = run(project, *stage_command(project, "train"), check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: params.yaml: train.device is 'cuda' but this machine has no cuda device"


def test_download_stage_falls_back_and_reports_every_mirror(tmp_path, synthetic_mirror, http_root):
    _, checksums = synthetic_mirror
    _, url = http_root
    project = copy_project(tmp_path / "project", checksums)
    result = run(project, "dvc", "repro", "download", mirror=f"{url}/absent", check=False)
    assert result.returncode != 0
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert error.startswith("error: could not get train-images-idx3-ubyte.gz from any mirror: ")
    assert f"{url}/absent/: HTTP 404" in error
    # The official mirrors come next; offline they fail to connect, online their real MNIST
    # does not match this copy's synthetic checksums.
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/: " in error
    assert "http://yann.lecun.com/exdb/mnist/: " in error
    assert "Traceback" not in result.stderr
    assert list((project / "data").glob("mnist/*")) == []  # nothing half-written


def test_experiment_with_one_epoch_shows_in_metrics_diff(built):
    # Last in this module: the experiment's results are applied to the copy's workspace.
    project, _, url = built
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "baseline")
    run(project, "dvc", "exp", "run", "-S", "train.epochs=1", mirror=url)
    diff = json.loads(run(project, "dvc", "metrics", "diff", "--json").stdout)
    loss = diff["metrics/eval.json"]["loss"]
    assert loss["new"] > loss["old"]  # one epoch instead of three
    params = json.loads(run(project, "dvc", "params", "diff", "--json").stdout)
    assert (params["params.yaml"]["train.epochs"]["old"], params["params.yaml"]["train.epochs"]["new"]) == (3, 1)
    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    assert shown  # the experiment is listed
