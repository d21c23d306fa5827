"""`dvc repro` in temporary copies of the project, on synthetic data served through MNIST_MIRROR."""

import hashlib
import json
import math
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import vl_convert
import yaml
from conftest import PROJECT, copy_project, run, set_params, stage_command
from dvc_render.html import HTML
from dvc_render.vega_templates import ConfusionTemplate, LinearTemplate
from PIL import Image

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
    assert "model.pt: gives evaluate's logits on the 200 test images, bit for bit" in result.stdout
    assert "model.pt2: gives evaluate's logits on the 200 test images, bit for bit" in result.stdout


def test_repro_writes_metrics_plots_and_models(built):
    project, _, _ = built
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert set(metrics) == {"loss", "accuracy"}
    assert 0.9 < metrics["accuracy"] <= 1.0  # each synthetic class has its own bright patch
    assert 0 < metrics["loss"] < math.log(10)  # better than guessing
    # DVCLive's files: a row per epoch from epoch 0 (the untrained model), and the last epoch's figures.
    live = project / "metrics" / "train"
    for name in ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr"):
        curve = pd.read_csv(live / "plots" / "metrics" / f"{name}.tsv", sep="\t")
        assert curve["step"].tolist() == [0, 1, 2, 3]
    test_loss = pd.read_csv(live / "plots" / "metrics" / "test" / "loss.tsv", sep="\t")["loss"]
    assert test_loss.iloc[0] > test_loss.iloc[-1]
    final = json.loads((live / "metrics.json").read_text())
    assert final["step"] == 3 and final["lr"] == 0.05
    assert final["test"] == metrics  # the train stage's last test pass measures what evaluate measures
    per_digit = pd.read_csv(project / "metrics" / "per_digit.csv")
    assert per_digit["digit"].tolist() == list(range(10))
    confusions = pd.read_csv(project / "metrics" / "confusions.csv")
    assert (confusions["actual"] != confusions["predicted"]).all()  # only the mistakes
    assert len(confusions) == round(N_TEST * (1 - metrics["accuracy"]))
    # 20 test images of each digit (see write_mirror): each mistake is 5% of its digit.
    assert per_digit["error_percent"].tolist() == [5.0 * (confusions["actual"] == d).sum() for d in range(10)]
    assert (project / "metrics" / "mistakes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (project / "metrics" / "augmented.gif").read_bytes()[:6] == b"GIF87a"
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


# The TorchScript archive of the trained model, as the export stage makes it but for the pinned hash seed.
UNPINNED_ARCHIVE = """
import hashlib, pathlib
from mnist_pipeline.export import torchscript_bytes
from mnist_pipeline.model import load_checkpoint
from mnist_pipeline.shipped import ShippedMLP
model = load_checkpoint(pathlib.Path("models/checkpoint.pt")).model
print(hashlib.sha256(torchscript_bytes(ShippedMLP(model))).hexdigest())
"""


def test_the_exported_files_do_not_change_with_the_hash_seed(built):
    """TorchScript writes a module's constants in set order, which follows Python's string hashing, whose
    seed is drawn anew in each process: the export stage pins it (PYTHONHASHSEED=0, by restarting
    itself). dvc repro ran it with a seed of its own; run again with another, it writes the same bytes.
    The negative control: the same archive written by a process of another seed than 0 differs."""
    project, _, _ = built
    files = ("model.pt", "model.pt2", "model.json")
    shipped = {name: (project / "models" / name).read_bytes() for name in files}
    run(project, *stage_command(project, "export"), PYTHONHASHSEED="1")
    assert {name: (project / "models" / name).read_bytes() for name in files} == shipped
    unpinned = run(project, "python", "-c", UNPINNED_ARCHIVE, PYTHONHASHSEED="1").stdout.strip()
    assert unpinned != hashlib.sha256(shipped["model.pt"]).hexdigest()


def test_committed_lock_records_the_committed_code_and_params():
    """A change to a stage's code or params without `dvc repro` leaves the baseline unreproducible; say which file."""
    lock = yaml.safe_load((PROJECT / "dvc.lock").read_text())
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for name, stage in lock["stages"].items():
        for dep in stage["deps"]:
            path = PROJECT / dep["path"]
            if path.is_file():
                digest = hashlib.md5(path.read_bytes()).hexdigest()
                assert digest == dep["md5"], f"{dep['path']} changed since dvc.lock's {name} stage: run dvc repro"
        for section, values in stage.get("params", {}).get("params.yaml", {}).items():
            for key, value in values.items():
                assert params[section][key] == value, f"params.yaml {section}.{key} differs from dvc.lock's {name}"


def test_second_repro_runs_nothing(built):
    project, _, url = built
    lock = (project / "dvc.lock").read_bytes()
    result = run(project, "dvc", "repro", mirror=url)
    assert "Running stage" not in result.stdout
    assert (project / "dvc.lock").read_bytes() == lock


def test_plots_are_defined_for_dvc(built):
    project, _, _ = built
    result = run(project, "dvc", "plots", "show", "--json")
    plots = json.loads(result.stdout)["data"]
    assert set(plots) == {
        *(f"metrics/train/plots/metrics/{name}.tsv" for name in ("train/loss", "train/accuracy", "lr")),
        *(f"metrics/train/plots/metrics/{name}.tsv" for name in ("test/loss", "test/accuracy")),
        "metrics/per_digit.csv",
        "metrics/confusions.csv",
        "metrics/mistakes.png",
        "metrics/augmented.gif",
    }
    assert plots["metrics/mistakes.png"][0]["type"] == plots["metrics/augmented.gif"][0]["type"] == "image"
    assert plots["metrics/per_digit.csv"][0]["content"]["title"]["text"] == "Test error per digit (%)"
    # No confusion plot when there is no mistake to show, as on this easy synthetic data.
    confusions = project / "metrics" / "confusions.csv"
    assert len(plots["metrics/confusions.csv"]) == (len(confusions.read_text().splitlines()) > 1)


def chromium() -> str:
    """The Chromium executable, or skip the test saying how to get it."""
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    return found


def rendered(page: Path) -> str:
    """The DOM of `page` after its scripts ran, in headless Chromium with no network (a dead proxy)."""
    result = subprocess.run(
        [
            chromium(),
            *("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"),
            *("--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>"),
            *("--virtual-time-budget=20000", "--dump-dom", page.as_uri()),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return result.stdout


def test_the_plots_page_draws_every_plot_with_no_network(built):
    project, _, _ = built
    run(project, "python", "-m", "mnist_pipeline.report", "template", ".dvc/tmp/offline-plots.html")  # make setup
    run(project, "dvc", "plots", "show")
    page = project / "dvc_plots" / "index.html"
    views = page.read_text().count("vegaEmbed('#")  # DVC writes one call per plot
    assert views == 7  # five curves, the per-digit bars and the confusions
    dom = rendered(page)
    assert dom.count('data-drawn="true"') == views  # set once vega-embed has drawn the view
    assert dom.count('class="marks"') == views  # each an SVG...
    assert dom.count('class="mark-line') >= 5  # ...with the curves' lines drawn
    assert dom.count('class="mark-rect') >= 1  # and the bars (no confusion cells: no mistakes on this data)
    images = re.findall(r'<img src="(static/[^"]+)"', dom)  # the pictures, files beside the page
    shown = sorted((project / "dvc_plots" / image).read_bytes() for image in images)
    assert shown == sorted((project / "metrics" / name).read_bytes() for name in ("mistakes.png", "augmented.gif"))
    # DVC's own page, which loads vega from a CDN, draws nothing here: the network is really off.
    (project / "cdn.html").write_text(HTML(None).template)
    run(project, "dvc", "plots", "show", "--html-template", "cdn.html", "--out", "cdn_plots")
    assert "data-drawn" not in rendered(project / "cdn_plots" / "index.html")
    assert "<svg" not in rendered(project / "cdn_plots" / "index.html")


def test_the_plot_templates_are_dvcs_own_but_for_one_change_each(built):
    # .dvc/plots/ replaces two of DVC's built-in templates, each in one respect; when DVC changes
    # its own, this says so.
    templates = PROJECT / ".dvc" / "plots"
    linear = json.loads((templates / "linear.json").read_text())
    formats = [layer["encoding"]["y"].pop("axis") for layer in linear["layer"] if "y" in layer["encoding"]]
    assert formats == [{"format": "~g"}] * 3  # the curves: y ticks printed in full
    assert linear == LinearTemplate.DEFAULT_CONTENT
    confusion = json.loads((templates / "confusion.json").read_text())
    assert confusion.pop("resolve") == {"scale": {"color": "independent"}}  # a colour scale per run
    assert confusion == ConfusionTemplate.DEFAULT_CONTENT
    # With DVC's format a constant learning rate of 0.05 had a single tick, labelled "0".
    project, _, _ = built
    plots = json.loads(run(project, "dvc", "plots", "show", "--json").stdout)["data"]
    [lr] = plots["metrics/train/plots/metrics/lr.tsv"]
    svg = vl_convert.vegalite_to_svg(lr["content"])
    y_axis = svg[svg.index('aria-label="Y-axis') :]
    tick_labels = re.search(r'role-axis-label".*?</g>', y_axis).group(0)
    assert re.findall(r">([^<>]+)</text>", tick_labels) == ["0.05"]


def test_report_writes_every_plot_as_an_image_and_a_markdown_summary(built):
    project, _, _ = built
    run(project, "python", "-m", "mnist_pipeline.report", "report", "report")  # what `make report` runs
    plots = json.loads(run(project, "dvc", "plots", "diff", "--json").stdout)["data"]
    images = sorted([*(project / "report").glob("*.png"), *(project / "report").glob("*.gif")])
    assert len(images) == sum(len(renderers) for renderers in plots.values())
    for image in images:
        with Image.open(image) as picture:
            assert picture.format in ("PNG", "GIF") and picture.width > 200 and picture.height > 100
    summary = (project / "report" / "README.md").read_text()
    assert "## Experiments (`dvc exp show --only-changed`, from HEAD and HEAD)" in summary
    assert "| Experiment " in summary  # exp show's markdown table
    assert "| Path " in summary and "metrics/eval.json" in summary  # metrics diff's
    assert all(f"]({image.name})" in summary for image in images)


def test_exp_show_lists_the_training_and_test_figures(built):
    project, _, _ = built
    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    workspace = next(entry for entry in shown if entry["rev"] == "workspace")
    final = workspace["data"]["metrics"]["metrics/train/metrics.json"]["data"]
    assert set(final) == {"train", "test", "lr", "step"}
    assert set(final["train"]) == set(final["test"]) == {"loss", "accuracy"}


def files_and_folders(project: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder (None) of a copy but git's own."""
    return {
        str(path.relative_to(project)): path.read_bytes() if path.is_file() else None
        for path in project.rglob("*")
        if ".git" not in path.relative_to(project).parts
    }


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("train", {"lr": -1}, "train.lr must be a positive finite number, got -1"),
        ("augment", {"rotation": 270}, "augment.rotation must be a number of degrees from 0 to 180, got 270"),
        ("augment", {"elastic_alpha": 34}, "augment.elastic_alpha above 0 needs augment.elastic_sigma above 0"),
    ],
)
def test_bad_params_fail_with_one_line_and_write_nothing(tmp_path, section, values, message):
    project = copy_project(tmp_path / "project")
    set_params(project, section, **values)
    before = files_and_folders(project)
    result = run(project, *stage_command(project, "train"), check=False)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: params.yaml: {message}")
    assert files_and_folders(project) == before  # no output, folder or temporary file appeared or changed


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_device_is_a_clear_error(tmp_path):
    project = copy_project(tmp_path / "project")
    set_params(project, device="cuda")
    result = run(project, *stage_command(project, "train"), check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: params.yaml: train.device is 'cuda' but this machine has no cuda device"


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A loopback URL whose port refuses connections: bound for the test's length, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_download_stage_falls_back_and_reports_every_mirror(tmp_path, synthetic_mirror, http_root, refusing_url):
    _, checksums = synthetic_mirror
    _, url = http_root
    project = copy_project(tmp_path / "project", checksums)
    # The official mirrors come next: reached through a proxy that refuses every connection, so that
    # the test needs no network and fails the same everywhere (loopback goes direct).
    offline = {"http_proxy": refusing_url, "https_proxy": refusing_url, "no_proxy": "127.0.0.1"}
    result = run(project, "dvc", "repro", "download", mirror=f"{url}/absent", check=False, **offline)
    assert result.returncode != 0
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert error.startswith("error: could not get train-images-idx3-ubyte.gz from any mirror: ")
    assert f"{url}/absent/: HTTP 404" in error
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/: " in error
    assert "http://yann.lecun.com/exdb/mnist/: " in error
    assert error.count("Connection refused") == 2
    assert "Traceback" not in result.stderr
    assert list((project / "data").glob("mnist/*")) == []  # nothing half-written


def test_experiment_with_one_epoch_shows_in_metrics_diff(built):
    # Last in this module but one: the experiment's results are applied to the copy's workspace.
    project, _, url = built
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "baseline")
    augmented = (project / "metrics" / "augmented.gif").read_bytes()
    run(project, "dvc", "exp", "run", "-S", "train.epochs=1", "-S", "augment.rotation=30", mirror=url)
    # A one-epoch run still draws lines: epoch 0 is the untrained model.
    curve = pd.read_csv(project / "metrics" / "train" / "plots" / "metrics" / "test" / "accuracy.tsv", sep="\t")
    assert curve["step"].tolist() == [0, 1] and curve["accuracy"].iloc[1] > curve["accuracy"].iloc[0]
    diff = json.loads(run(project, "dvc", "metrics", "diff", "--json").stdout)
    loss = diff["metrics/eval.json"]["loss"]
    assert loss["new"] > loss["old"]  # one epoch instead of three
    params = json.loads(run(project, "dvc", "params", "diff", "--json").stdout)
    assert (params["params.yaml"]["train.epochs"]["old"], params["params.yaml"]["train.epochs"]["new"]) == (3, 1)
    # What each fed the model: the baseline's digits as they are, the experiment's turned.
    assert (project / "metrics" / "augmented.gif").read_bytes() != augmented
    pictures = json.loads(run(project, "dvc", "plots", "diff", "--json").stdout)["data"]["metrics/augmented.gif"]
    assert sorted(picture["revisions"][0] for picture in pictures) == ["HEAD", "workspace"]
    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    [experiment] = [e for entry in shown for e in entry.get("experiments") or []]  # listed, with its params
    params = experiment["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert (params["train"]["epochs"], params["augment"]["rotation"]) == (1, 30)


def test_the_pull_request_report_shows_a_branchs_changes_against_its_base(built):
    """What `make pr-report BASE=<base>` writes, on a branch whose params (one epoch, digits turned
    30 degrees) and results are the previous test's experiment."""
    project, _, _ = built
    base = run(project, "git", "rev-parse", "--abbrev-ref", "HEAD").stdout.strip()
    run(project, "git", "checkout", "-qb", "one-epoch")
    run(project, "git", "commit", "-qam", "One epoch, digits turned")
    run(project, "python", "-m", "mnist_pipeline.report", "report", "report", "--base", base)  # after `dvc repro`
    summary = (project / "report" / "README.md").read_text()
    params = summary.split("## Params")[1].split("## Metrics")[0]
    assert re.search(r"\| params\.yaml\s*\| train\.epochs\s*\| 3\s*\| 1\s*\|", params)
    assert re.search(r"\| params\.yaml\s*\| augment\.rotation\s*\| 0(\.0)?\s*\| 30\s*\|", params)
    assert "train.lr" not in params  # only what changed
    metrics = summary.split("## Metrics")[1].split("## Experiments")[0]
    [loss] = [row for row in metrics.splitlines() if re.match(r"\| metrics/eval\.json\s*\| loss ", row)]
    old, new, change = (float(cell) for cell in loss.strip("| ").split("|")[2:5])
    assert new > old and change == pytest.approx(new - old, abs=1e-4)  # one epoch instead of three
    # The base has its row, and the params the branch changed their columns.
    experiments = summary.split("## Experiments")[1].split("## Plots")[0].splitlines()
    header = next(line for line in experiments if line.startswith("| Experiment"))
    assert "train.epochs" in header and "augment.rotation" in header
    assert any(re.match(rf"\|\s*{re.escape(base)}\s*\|", line) for line in experiments)
    links = re.findall(r"\]\(([^)]+)\)", summary)
    assert len(links) == 11  # 5 curves, the per-digit errors and the confusions, and 2 pictures a revision
    for link in links:
        with Image.open(project / "report" / link) as picture:
            assert picture.format in ("PNG", "GIF") and picture.width > 100 and picture.height > 100
    for picture in ("metrics/mistakes.png", "metrics/augmented.gif"):  # base beside head
        assert f"### {picture}\n\n| {base} | workspace |" in summary
