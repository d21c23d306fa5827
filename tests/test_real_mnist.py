"""End to end on the real MNIST files: two epochs through `dvc repro`, then the model used with torch alone."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import PROJECT, copy_project, run, set_params

from mnist_pipeline.data import load_mnist

MIRROR = os.environ.get("MNIST_MIRROR")
pytestmark = pytest.mark.skipif(
    not MIRROR,
    reason="MNIST_MIRROR is unset: point it at the real MNIST .gz files (e.g. ../shared/datasets/mnist) "
    "to run the end-to-end tests on real data",
)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project (with the published checksums) after `dvc repro` with two epochs.

    One epoch of the default recipe lands at 0.896-0.905 depending on the seed; two clear 0.9.
    """
    copy = copy_project(tmp_path_factory.mktemp("real"))
    set_params(copy, epochs=2)
    # A relative MNIST_MIRROR is relative to the project root, not to the copy.
    mirror = MIRROR if "://" in MIRROR else str((PROJECT / MIRROR).resolve())
    run(copy, "dvc", "repro", mirror=mirror)
    return copy


def test_download_gives_the_known_dataset(project):
    images, labels = load_mnist(project / "data" / "mnist", "train")
    assert images.shape == (60000, 28, 28)
    assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert images.mean() / 255 == pytest.approx(0.1306604762738429, abs=1e-9)
    test_images, _ = load_mnist(project / "data" / "mnist", "test")
    assert test_images.shape == (10000, 28, 28)


def test_two_epochs_reach_90_percent(project):
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert metrics["accuracy"] > 0.9
    assert 0 < metrics["loss"] < 0.5


def test_exported_model_works_with_torch_alone(project):
    """A fresh interpreter that imports only torch scores the same accuracy as the metrics."""
    script = textwrap.dedent(
        """
        import sys, torch
        model = torch.jit.load(sys.argv[1])
        images = open(sys.argv[2], "rb").read()[16:]  # IDX header: magic + 3 dimensions
        labels = open(sys.argv[3], "rb").read()[8:]  # IDX header: magic + 1 dimension
        x = torch.frombuffer(bytearray(images), dtype=torch.uint8).view(-1, 1, 28, 28).float() / 255
        y = torch.frombuffer(bytearray(labels), dtype=torch.uint8).long()
        with torch.no_grad():
            correct = (model(x).argmax(1) == y).sum().item()
        print(correct / len(y), [m for m in sys.modules if m.startswith("mnist_pipeline")])
        """
    )
    data = project / "data" / "mnist"
    result = subprocess.run(
        [
            sys.executable,
            "-I",  # isolated: no PYTHONPATH, no current directory on the path
            "-W",
            "ignore::FutureWarning",
            "-c",
            script,
            str(project / "models" / "model.pt"),
            str(data / "t10k-images-idx3-ubyte"),
            str(data / "t10k-labels-idx1-ubyte"),
        ],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    )
    accuracy, imported = result.stdout.split(maxsplit=1)
    assert imported.strip() == "[]"
    assert float(accuracy) == json.loads((project / "metrics" / "eval.json").read_text())["accuracy"]


@pytest.mark.skipif(
    not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++")),
    reason="building the C++ example needs cmake and a C++ compiler",
)
def test_cpp_example_scores_the_same_accuracy(project, tmp_path):
    import torch

    build = tmp_path / "build"
    subprocess.run(
        [
            "cmake",
            "-S",
            PROJECT / "examples" / "cpp",
            "-B",
            build,
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        ],
        capture_output=True,
        check=True,
    )
    subprocess.run(["cmake", "--build", build], capture_output=True, check=True)
    data = project / "data" / "mnist"
    result = subprocess.run(
        [
            build / "mnist_classify",
            project / "models" / "model.pt",
            data / "t10k-images-idx3-ubyte",
            data / "t10k-labels-idx1-ubyte",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    correct, total = result.stdout.split()[1].split("/")  # "accuracy 9749/10000 = 0.9749"
    assert int(total) == 10000
    assert int(correct) / int(total) == json.loads((project / "metrics" / "eval.json").read_text())["accuracy"]
