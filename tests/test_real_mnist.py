"""End to end on the real MNIST files: the default params through `dvc repro`, as a user runs them on a
fresh clone, must give the committed baseline byte for byte; then the model is used with torch alone."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ELSEWHERE, PROJECT, consume, copy_project, run
from PIL import Image

from mnist_pipeline.data import load_mnist
from mnist_pipeline.export import DigitClassifier
from mnist_pipeline.model import load_checkpoint
from mnist_pipeline.numerics import describe_cpu
from mnist_pipeline.report import AUGMENTATION_FIGURE

MIRROR = os.environ.get("MNIST_MIRROR")
pytestmark = pytest.mark.skipif(
    not MIRROR,
    reason="MNIST_MIRROR is unset: point it at the real MNIST .gz files (e.g. ../shared/datasets/mnist) "
    "to run the end-to-end tests on real data",
)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A copy of the project, committed as it is (dvc.lock and metrics/ included), after `dvc repro
    --force` with the default params: the user's `make repro` on a fresh clone, with every stage run.
    (A plain `dvc repro` skips evaluate there, since its outputs come with git and its deps match.)
    Returns the copy and the pipeline's files (dvc.lock, which holds the md5 of every output DVC
    tracks, and metrics/) that differ from the project's last commit."""
    copy = copy_project(tmp_path_factory.mktemp("real"))
    # A relative MNIST_MIRROR is relative to the project root, not to the copy.
    mirror = MIRROR if "://" in MIRROR else str((PROJECT / MIRROR).resolve())
    run(copy, "dvc", "repro", "--force", mirror=mirror)
    # Against the commit, not the working tree the copy was made from: after `make repro` on a machine
    # that computed other bytes, the working tree holds those bytes already.
    run(copy, "git", "fetch", "-q", str(PROJECT), "HEAD")
    changed = run(copy, "git", "diff", "--name-only", "FETCH_HEAD", "--", "dvc.lock", "metrics").stdout
    return copy, changed.splitlines()


@pytest.fixture(scope="module")
def project(reproduced):
    """The reproduced copy, whatever this machine computed, committed."""
    copy, _ = reproduced
    run(copy, "git", "add", "-A")
    run(copy, "git", "commit", "-qm", "reproduced", "--allow-empty")
    return copy


def test_dvc_repro_gives_the_committed_baseline_byte_for_byte(reproduced):
    """The project's promise: a clone reproduces dvc.lock and every tracked output exactly, on this machine."""
    _, changed = reproduced
    assert changed == [], (
        f"dvc repro with the committed params did not reproduce the committed baseline (HEAD) on this machine: "
        f"{describe_cpu()}, torch {torch.__version__}. These files differ from HEAD's: {', '.join(changed)}"
    )


def test_make_figures_draws_the_committed_augmentation_picture_byte_for_byte(project):
    """The best recipe's deformations of real digits, as the README shows them: the same pixels on
    every machine, and so the same PNG (it has no text to render)."""
    run(project, "python", "-m", "mnist_pipeline.report", "figures", "drawn")  # make figures, into drawn/
    drawn = (project / "drawn" / AUGMENTATION_FIGURE).read_bytes()
    shutil.rmtree(project / "drawn")
    show = ["git", "show", f"HEAD:docs/figures/{AUGMENTATION_FIGURE}"]
    committed = subprocess.run(show, cwd=PROJECT, capture_output=True, check=True).stdout
    assert drawn == committed, (
        f"make figures drew another docs/figures/{AUGMENTATION_FIGURE} than HEAD's on this machine: "
        f"{describe_cpu()}, torch {torch.__version__}"
    )


def test_the_default_recipe_reaches_97_percent(project):
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert metrics["accuracy"] > 0.97
    assert 0 < metrics["loss"] < 0.1


def test_download_gives_the_known_dataset(project):
    images, labels = load_mnist(project / "data" / "mnist", "train")
    assert images.shape == (60000, 28, 28)
    assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert images.mean() / 255 == pytest.approx(0.1306604762738429, abs=1e-9)
    test_images, _ = load_mnist(project / "data" / "mnist", "test")
    assert test_images.shape == (10000, 28, 28)


@pytest.fixture(scope="module")
def plain_model(project, tmp_path_factory):
    """The negative control of the checks below: the trained weights in a TorchScript file of torch's own
    float32 arithmetic, with model.pt's inputs and methods."""
    path = tmp_path_factory.mktemp("plain") / "plain.pt"
    model = load_checkpoint(project / "models" / "checkpoint.pt").model
    torch.jit.save(torch.jit.script(DigitClassifier(model)), path)
    return path


def card_figures(project: Path) -> dict:
    """The model card's test accuracy and logits hash, as the consumer reports its own."""
    card = json.loads((project / "models" / "model.json").read_text())
    return {"accuracy": card["metrics"]["accuracy"], "sha256": card["test_logits"]["sha256"]}


@pytest.mark.parametrize("setting", ELSEWHERE)
def test_the_model_gives_the_cards_logits_to_a_user_with_torch_alone(project, plain_model, setting):
    """models/model.pt in a fresh Python that imports torch alone, with what differs between machines
    changed: the test set in one batch gives the card's accuracy and logits hash exactly. As installed,
    also in thousands and in sevens, and model.pt2 in one batch; and there the plain float32
    TorchScript of the same weights gives other logits. (One image at a time: the C++ example, below,
    under every setting, and mnist-predict --check, which the README's commands run.)"""
    data = project / "data" / "mnist"
    model, program = project / "models" / "model.pt", project / "models" / "model.pt2"
    models = [f"{model}@0"]
    if setting == "as installed":
        models = [f"{model}@0,1000,7", f"{program}@0", f"{plain_model}@0"]
    images, labels = data / "t10k-images-idx3-ubyte", data / "t10k-labels-idx1-ubyte"
    results = consume(setting, images, labels, models)
    expected = card_figures(project)
    for path in (model, program) if setting == "as installed" else (model,):
        for batch, result in results[str(path)].items():
            if batch != "probabilities":
                assert result == expected, (path.name, batch)
    if setting == "as installed":
        assert results[str(plain_model)]["10000"]["sha256"] != expected["sha256"]


HAVE_CPP = bool(shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++")))


def readme_blocks(language: str, page: str = "README.md", heading: str = "## Use the model") -> list[str]:
    """The code blocks in `language` of one section of the README (or of a page in docs/)."""
    text = (PROJECT / page).read_text()
    section = text.split(f"{heading}\n")[1].split("\n## ")[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)


@pytest.fixture(scope="module")
def pictures(project):
    """Real test digits as the files the README names: digit.png and digit.pgm (a 7), scan.jpg (a 2:
    dark on light paper, off-centre, 7 times larger)."""
    images, labels = load_mnist(project / "data" / "mnist", "test")
    assert labels[0] == 7 and labels[1] == 2
    Image.fromarray(images[0]).save(project / "digit.png")
    Image.fromarray(images[0]).save(project / "digit.pgm")
    paper = np.full((320, 260), 235, np.uint8)
    two = np.asarray(Image.fromarray(255 - images[1]).resize((196, 196), Image.Resampling.BICUBIC))
    paper[10:206, 50:246] = np.minimum(paper[10:206, 50:246], two)
    Image.fromarray(paper).convert("RGB").save(project / "scan.jpg")
    return project


@pytest.fixture(scope="module")
def uv_shim(tmp_path_factory):
    """A `uv` whose `uv run CMD` runs CMD from this test environment, so README commands run as written."""
    directory = tmp_path_factory.mktemp("shim")
    (directory / "uv").write_text('#!/bin/sh\n[ "$1" = run ] && shift\nexec "$@"\n')
    (directory / "uv").chmod(0o755)
    return directory


def run_shell(project: Path, script: str, shim: Path) -> str:
    """Run README commands as written, in bash, with the `uv` shim; return what they printed."""
    return run(project, "bash", "-e", "-c", script, tools=shim).stdout


def test_readme_python_snippet_runs_with_torch_alone(project):
    [snippet] = readme_blocks("python")
    result = subprocess.run(
        [sys.executable, "-I", "-W", "ignore::FutureWarning", "-c", snippet],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    )
    sha256 = card_figures(project)["sha256"]
    assert result.stdout.splitlines() == [
        "torch.Size([2, 10])",
        "tensor([1., 1.])",
        "torch.Size([5, 10])",
        sha256,
        sha256,
    ]


def test_readme_predict_commands_classify_real_digits_and_check_the_card(pictures, uv_shim):
    predict, predict_json, check = readme_blocks("sh")[0].strip().splitlines()
    lines = run_shell(pictures, predict, uv_shim).splitlines()
    assert [line.split(" (")[0] for line in lines] == ["digit.png: 7", "scan.jpg: 2"]
    [result] = json.loads(run_shell(pictures, predict_json, uv_shim))
    assert result["file"] == "digit.png" and result["digit"] == 7 and result["probability"] > 0.5
    expected = card_figures(pictures)
    lines = run_shell(pictures, check, uv_shim).splitlines()  # bash -e: its exit status is 0
    assert len(lines) == 4 and all(
        f"accuracy {expected['accuracy']}  logits sha256 {expected['sha256']}" in line for line in lines[:3]
    )


def test_predict_classifies_a_handful_of_real_test_digits(project, tmp_path, uv_shim):
    images, labels = load_mnist(project / "data" / "mnist", "test")
    for index in range(8):
        Image.fromarray(images[index]).save(tmp_path / f"{index}.png")
    files = " ".join(str(tmp_path / f"{index}.png") for index in range(8))
    results = json.loads(run_shell(project, f"uv run mnist-predict --json {files}", uv_shim))
    assert [r["digit"] for r in results] == labels[:8].tolist()


@pytest.fixture(scope="module")
def cpp_example(pictures, uv_shim):
    """The README's C++ commands, run as written: they build examples/cpp and run it on the test set (with
    the card) and on two pictures. Returns what they printed (cmake's messages, then the program's)."""
    if not HAVE_CPP:
        pytest.skip("building the C++ example needs cmake and a C++ compiler")
    return run_shell(pictures, readme_blocks("sh")[1], uv_shim)


def test_readme_cpp_example_builds_and_gives_the_cards_logits(pictures, cpp_example):
    expected = card_figures(pictures)
    scores = re.findall(r"^batch (\d+): accuracy (\d+)/(\d+) = [\d.]+, logits sha256 (\w+)$", cpp_example, re.MULTILINE)
    assert [batch for batch, *_ in scores] == ["10000", "1"]
    for _, correct, total, sha256 in scores:
        assert int(correct) / int(total) == expected["accuracy"] and sha256 == expected["sha256"]
    assert f"card: accuracy {expected['accuracy']}, logits sha256 {expected['sha256']}" in cpp_example
    assert re.findall(r"^(digit\.\w+: \d) \(probability", cpp_example, re.MULTILINE) == ["digit.pgm: 7", "digit.png: 7"]


@pytest.fixture(scope="module")
def cpp_program(pictures, cpp_example) -> str:
    """The program the README's C++ commands built."""
    return str(pictures / "build" / "cpp" / "mnist_classify")


CPP_TEST_SET = ["data/mnist/t10k-images-idx3-ubyte", "data/mnist/t10k-labels-idx1-ubyte", "models/model.json"]


# The C++ program sets neither a thread count nor the products' precision: libtorch caps OMP_NUM_THREADS
# at the cores, and leaves float32 products at "highest". These two are a Python user's settings alone.
PYTHON_ONLY = ("3 threads", "bf16 products allowed")


@pytest.mark.parametrize("setting", [setting for setting in ELSEWHERE if setting not in ("as installed", *PYTHON_ONLY)])
def test_the_cpp_example_gives_the_cards_logits_anywhere(pictures, cpp_program, setting):
    """The C++ program checks a machine against the card (exit status 0), in one batch and one image at a
    time, with what differs between machines changed (as installed: the README's commands, above)."""
    variables, _, _ = ELSEWHERE[setting]
    output = run(pictures, cpp_program, "models/model.pt", *CPP_TEST_SET, **variables).stdout
    assert output.count(card_figures(pictures)["sha256"]) == 3


def test_the_cpp_example_fails_the_check_with_a_plain_float32_model(pictures, cpp_program, plain_model):
    """The negative control: the trained weights in torch's own float32 arithmetic give other logits."""
    failed = run(pictures, cpp_program, str(plain_model), *CPP_TEST_SET, check=False)
    assert failed.returncode == 1
    assert failed.stderr == "error: this machine computes other logits than the card records (models/model.json)\n"


def test_the_cpp_example_says_in_one_line_that_a_model_is_unusable(pictures, cpp_program):
    (pictures / "truncated.pt").write_bytes((pictures / "models" / "model.pt").read_bytes()[:100])
    for model in ("missing.pt", "truncated.pt"):
        result = run(pictures, cpp_program, model, "digit.png", check=False)
        assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    (pictures / "truncated.pt").unlink()


def test_the_artifact_commands_fetch_the_model(project, uv_shim, tmp_path):
    [commands] = readme_blocks("sh", "docs/model.md", "# The model and its contract")
    run_shell(project, commands, uv_shim)
    assert (project / "shipped.pt").read_bytes() == (project / "models" / "model.pt").read_bytes()
    script = "import dvc.api, sys; print(dvc.api.artifacts_show('mnist-mlp', repo=sys.argv[1])['path'])"
    shown = run(project, "python", "-c", script, str(project))  # in the user's environment, as `uv run python`
    assert shown.stdout.strip() == "models/model.pt"


def test_model_card_is_complete_and_its_hashes_are_true(project):
    card = json.loads((project / "models" / "model.json").read_text())
    for artifact in card["artifacts"].values():
        content = (project / "models" / artifact["file"]).read_bytes()
        assert artifact["sha256"] == hashlib.sha256(content).hexdigest()
    logits = (project / "metrics" / "test_logits.bin").read_bytes()
    assert len(logits) == 10000 * 10 * 4 and card["test_logits"]["sha256"] == hashlib.sha256(logits).hexdigest()
    assert card["metrics"]["accuracy"] == json.loads((project / "metrics" / "eval.json").read_text())["accuracy"]
    assert card["architecture"]["layers"] == [784, 520, 320, 240, 120, 10]
    assert card["training"]["epochs"] == 9 and card["training"]["arithmetic"] == "portable"
    assert card["training"]["augment"] == {name: 0.0 for name in card["training"]["augment"]}  # none by default
    assert len(card["training"]["augment"]) == 6
    assert card["labels"] == [str(d) for d in range(10)]
    assert card["normalization"] == {"mean": 0.1307, "std": 0.3081, "applied": "inside the model"}
    assert card["torch_version"] == torch.__version__
    assert set(card["input"]) == {"torchscript", "torch_export"}
