"""Faults a user meets, run as they would meet them, in a copy of the project on synthetic data:
a diverging training, a damaged checkpoint, stages killed by SIGTERM and SIGKILL, parameters
beyond what the machine can do, a Python without the project's packages. Each ends in one clear
line and a non-zero exit, leaves nothing half-written, and the next `dvc repro` succeeds.

(Faults of the network and of images are in test_download.py and test_predict.py.)
"""

import re
import shutil
import signal
import subprocess
import venv
from pathlib import Path

import pytest
import yaml
from conftest import (
    COMMAND_TIMEOUT,
    TRAIN_OUTPUTS,
    bare_environment,
    copy_project,
    remove_train_outputs,
    run,
    set_params,
    stage_command,
    train_outputs,
    training,
)

from mnist_pipeline.resume import STATE_FOLDER

OUTPUTS = (
    "models/checkpoint.pt",
    "metrics/train/metrics.json",
    "metrics/eval.json",
    "models/model.pt",
    "models/model.pt2",
    "models/model.json",
)


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, synthetic_mirror):
    """A committed copy whose data is downloaded but nothing trained, and its MNIST_MIRROR."""
    directory, checksums = synthetic_mirror
    project = copy_project(tmp_path_factory.mktemp("faults"), checksums)
    set_params(project, epochs=2)
    run(project, "dvc", "repro", "download", mirror=str(directory))
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "data")
    return project, str(directory)


def errors(stderr: str) -> list[str]:
    """Our stages' one-line errors, without DVC's own report of the failed stage."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def snapshot(project: Path) -> dict[str, bytes | None]:
    """The pipeline's outputs after download, None for those absent."""
    return {name: (project / name).read_bytes() if (project / name).exists() else None for name in OUTPUTS}


def leftovers(project: Path) -> list[str]:
    """Temporary files that a stage left behind."""
    return sorted(p.name for folder in ("models", "metrics", "data") for p in (project / folder).glob(".*tmp"))


def test_a_diverging_training_stops_with_one_line_and_ships_nothing(downloaded):
    project, mirror = downloaded
    before = snapshot(project)
    result = run(project, "dvc", "exp", "run", "-S", "train.lr=1000", mirror=mirror, check=False)  # docs/pipeline.md's
    assert result.returncode != 0
    [error] = errors(result.stderr)
    assert error.startswith("error: params.yaml: training diverged at epoch 1, step ")
    assert error.endswith("(learning rate 1000); lower train.lr")
    assert "Traceback" not in result.stderr
    assert "Running stage 'evaluate'" not in result.stdout
    # Nothing written: DVC removed the train stage's outputs before running it, the committed
    # metrics stayed as they were, and no model appeared.
    assert all(content in (before[name], None) for name, content in snapshot(project).items())
    assert snapshot(project)["models/model.pt"] is None
    assert leftovers(project) == []
    # The failed experiment leaves its params in params.yaml, as DVC does. Not `git checkout`: DVC has
    # refreshed git's index within the second, so git takes "1000" for the committed "0.01", of one length.
    (project / "params.yaml").write_text(run(project, "git", "show", "HEAD:params.yaml").stdout)
    assert "Running stage 'export'" in run(project, "dvc", "repro", mirror=mirror).stdout


def test_a_damaged_checkpoint_is_one_line_and_the_next_repro_mends_it(downloaded):
    project, mirror = downloaded
    run(project, "dvc", "repro", mirror=mirror)
    # Emptied and truncated; test_model.py tries many more kinds of damage on load_checkpoint.
    checkpoint = project / "models" / "checkpoint.pt"
    for damage, stage in ((b"", "evaluate"), (checkpoint.read_bytes()[:1000], "export")):
        checkpoint.write_bytes(damage)
        result = run(project, "dvc", "repro", "--force", "--single-item", stage, mirror=mirror, check=False)
        assert result.returncode != 0
        [error] = errors(result.stderr)
        assert error.startswith("error: models/checkpoint.pt: ")
        assert error.endswith("; the train stage rewrites it: dvc repro train")
        assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    run(project, "dvc", "repro", mirror=mirror)
    assert "Data and pipelines are up to date." in run(project, "dvc", "status").stdout


def fresh_start(project: Path) -> None:
    """No output and no saved state, as DVC leaves a stage that it is about to run again."""
    remove_train_outputs(project)
    shutil.rmtree(project / STATE_FOLDER, ignore_errors=True)


@pytest.fixture(scope="module")
def uninterrupted(downloaded):
    """The train stage's outputs from its own command with the committed params (2 epochs), not stopped."""
    project, _ = downloaded
    fresh_start(project)
    run(project, *stage_command(project, "train"))
    outputs = train_outputs(project)
    assert all(outputs.values())
    return outputs


@pytest.mark.parametrize(
    ("sent", "epochs", "until"),
    [
        (signal.SIGTERM, 100_000, "training on"),  # before the first step
        (signal.SIGINT, 100_000, "epoch 1:"),  # DVCLive's files written and open, a state saved
        (signal.SIGTERM, 2, "trained "),  # training done: the outputs are being written
    ],
)
def test_a_stage_stopped_by_sigterm_or_ctrl_c_says_so_and_leaves_nothing(
    downloaded, uninterrupted, sent, epochs, until
):
    """Each output is whole or absent wherever the signal lands: before the first step, once an epoch is
    logged, or while the outputs are written, where the stage may also have ended first (and whole)."""
    project, _ = downloaded
    fresh_start(project)
    with training(project, until=until, epochs=epochs) as process:
        process.send_signal(sent)
        _, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
    outputs = train_outputs(project)
    assert leftovers(project) == []
    if process.returncode == 0:  # it wrote its last output before the signal came
        assert until == "trained " and outputs == uninterrupted
        return
    assert process.returncode == 128 + sent
    assert errors(stderr) == [] and "Traceback" not in stderr
    assert stderr.splitlines()[-1] == f"interrupted ({sent.name})"
    if epochs == 2:
        assert all(outputs[name] in (None, uninterrupted[name]) for name in TRAIN_OUTPUTS)
    else:
        assert outputs == dict.fromkeys(TRAIN_OUTPUTS)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        # The rest of the checks are in test_params.py: these two crashed the stage before.
        ("train", "num_threads", 100_000, r"train.num_threads must be an integer from 0 \(all cores\) to \d+"),
        ("train", "nproc", 10_000, r"train.nproc is 10000 but this machine has \d+ cores \(each process needs one\)"),
        (
            "model",
            "hidden_sizes",
            [10**6, 10**6],
            r"model.hidden_sizes \[1000000, 1000000\] makes [\d,]+ weights, which",
        ),
    ],
)
def test_params_beyond_what_the_machine_can_do_are_one_line(downloaded, section, key, value, expected):
    project, _ = downloaded
    params = project / "params.yaml"
    original = params.read_text()
    changed = yaml.safe_load(original)
    changed[section][key] = value
    try:
        params.write_text(yaml.safe_dump(changed))
        result = run(project, *stage_command(project, "train"), check=False)
    finally:
        params.write_text(original)
    assert result.returncode == 1
    [error] = result.stderr.splitlines()
    assert error.startswith("error: params.yaml: ")
    assert re.search(expected, error), error


def test_a_stage_run_by_a_python_without_the_projects_packages_says_how_to_run_it(tmp_path, downloaded):
    project, _ = downloaded
    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)  # what `python` is when `dvc` comes from another environment
    command = stage_command(project, "train")
    result = subprocess.run(
        [str(bare / "bin" / "python"), *command[1:]],
        cwd=project,
        env=bare_environment(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    [error] = result.stderr.splitlines()
    assert error.startswith(f"error: {bare / 'bin' / 'python'} lacks the project's packages (torch")
    assert error.endswith("run the pipeline in the project's environment, with `uv run dvc repro` or `make repro`")
