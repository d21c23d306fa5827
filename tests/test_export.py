import io
import zipfile

import pytest
import torch
from conftest import PROJECT

from mnist_pipeline import export
from mnist_pipeline.export import export_program, export_torchscript, torchscript_bytes
from mnist_pipeline.model import MLP
from mnist_pipeline.stage import PipelineError
from mnist_pipeline.torchscript import load_torchscript


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MLP([32, 16]).eval()


@pytest.fixture(scope="module")
def scripted(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.pt"
    images = torch.rand(4, 1, 28, 28)
    export_torchscript(model, path, images, model(images))
    return load_torchscript(path)


def test_exported_module_matches_the_eager_model(model, scripted):
    images = torch.rand(100, 1, 28, 28)
    assert torch.allclose(scripted(images), model(images), atol=1e-6)


def test_every_accepted_input_form_gives_the_same_logits(model, scripted):
    pixels = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    expected = model(pixels.float().div(255).unsqueeze(1))
    for images in (pixels, pixels.unsqueeze(1), pixels.float() / 255, pixels.float().unsqueeze(1) / 255):
        logits = scripted(images)
        assert logits.shape == (3, 10) and logits.dtype == torch.float32
        assert torch.allclose(logits, expected, atol=1e-6)


def test_probabilities_are_the_softmax_of_the_logits(scripted):
    images = torch.rand(5, 28, 28)
    probabilities = scripted.probabilities(images)
    assert torch.allclose(probabilities.sum(1), torch.ones(5))
    assert torch.allclose(probabilities, torch.softmax(scripted(images), 1))


@pytest.mark.parametrize("n", [1, 10_000])
def test_batch_sizes_from_one_to_ten_thousand(scripted, n):
    assert scripted(torch.rand(n, 1, 28, 28)).shape == (n, 10)
    assert scripted.probabilities(torch.zeros(n, 28, 28, dtype=torch.uint8)).shape == (n, 10)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(2, 784), r"expected images of shape \[N, 28, 28\] or \[N, 1, 28, 28\], got \[2, 784\]"),
        (torch.rand(2, 3, 28, 28), r"expected images of shape .*, got \[2, 3, 28, 28\]"),
        (torch.rand(28, 28), r"expected images of shape .*, got \[28, 28\]"),
        (torch.rand(2, 28, 28, dtype=torch.float64), r"expected float32 pixels in \[0, 1\] or uint8 pixels in 0..255"),
        (torch.randint(0, 9, (2, 28, 28)), r"expected float32 pixels in \[0, 1\] or uint8"),
        (torch.rand(2, 28, 28) * 255, r"float32 pixels must be in \[0, 1\] \(pass uint8 for 0..255 values\)"),
    ],
)
def test_wrong_inputs_say_what_was_expected(scripted, images, message):
    with pytest.raises(torch.jit.Error, match=message):
        scripted(images)


def test_saved_bytes_carry_no_source_paths_and_do_not_change(model):
    first = torchscript_bytes(model)
    assert first == torchscript_bytes(model)
    assert str(PROJECT).encode() not in first
    names = zipfile.ZipFile(io.BytesIO(first)).namelist()
    assert not any(name.endswith(".debug_pkl") for name in names)
    assert all(name.startswith("archive/") for name in names)


def test_torch_export_program_has_a_dynamic_batch_and_stable_bytes(model, tmp_path):
    images = torch.rand(7, 1, 28, 28)
    assert export_program(model, tmp_path / "model.pt2", images, model(images)) <= 1e-5
    program = torch.export.load(tmp_path / "model.pt2").module()
    for n in (1, 7, 10_000):
        batch = torch.rand(n, 1, 28, 28)
        assert torch.allclose(program(batch), model(batch), atol=1e-6)
    content = (tmp_path / "model.pt2").read_bytes()
    assert str(PROJECT).encode() not in content
    export_program(model, tmp_path / "again.pt2", images, model(images))
    assert (tmp_path / "again.pt2").read_bytes() == content


def test_a_failed_parity_check_leaves_no_file(tmp_path, model, monkeypatch):
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(PipelineError, match=r"model.pt: exported model differs from the trained one"):
        images = torch.rand(10, 1, 28, 28)
        export_torchscript(model, tmp_path / "model.pt", images, model(images))
    assert list(tmp_path.iterdir()) == []
