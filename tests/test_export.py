import io
import zipfile

import pytest
import torch
from conftest import PROJECT

from mnist_pipeline import export
from mnist_pipeline.export import export_torchscript, torchscript_bytes
from mnist_pipeline.model import MLP
from mnist_pipeline.stage import PipelineError


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MLP([32, 16]).eval()


def test_exported_module_matches_the_eager_model(tmp_path, model):
    images = torch.rand(100, 1, 28, 28)
    difference = export_torchscript(model, tmp_path / "model.pt", images)
    assert difference <= 1e-5
    loaded = torch.jit.load(tmp_path / "model.pt")
    assert torch.allclose(loaded(images), model(images), atol=1e-6)
    assert loaded(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_saved_bytes_carry_no_source_paths_and_do_not_change(model):
    first = torchscript_bytes(model)
    assert first == torchscript_bytes(model)
    assert str(PROJECT).encode() not in first
    names = zipfile.ZipFile(io.BytesIO(first)).namelist()
    assert not any(name.endswith(".debug_pkl") for name in names)
    assert all(name.startswith("archive/") for name in names)


def test_a_failed_parity_check_leaves_no_file(tmp_path, model, monkeypatch):
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(PipelineError, match=r"model.pt: exported model differs from the trained one"):
        export_torchscript(model, tmp_path / "model.pt", torch.rand(10, 1, 28, 28))
    assert list(tmp_path.iterdir()) == []
