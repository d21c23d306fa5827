import json

import numpy as np
import pytest
import torch
from PIL import Image

from mnist_pipeline.export import export_torchscript
from mnist_pipeline.model import MLP
from mnist_pipeline.predict import main, to_mnist


def centre_of_mass(pixels: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(pixels.shape)
    return (rows * pixels).sum() / pixels.sum(), (cols * pixels).sum() / pixels.sum()


def bounding_box(pixels: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(pixels > 64)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_a_dark_stroke_on_light_paper_becomes_an_mnist_digit():
    paper = np.full((300, 200), 240, np.uint8)
    paper[30:150, 140:170] = 10  # a tall dark bar near the top right
    digit = to_mnist(Image.fromarray(paper))
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert digit[0].max() == 0 and digit[:, 0].max() == 0  # black background
    assert max(bounding_box(digit)) == 20  # longest side fitted to 20 pixels
    row, col = centre_of_mass(digit.astype(np.float64))
    assert abs(row - 14) <= 0.5 and abs(col - 14) <= 0.5  # centre of mass where MNIST puts it


def test_a_light_digit_on_black_keeps_its_polarity_and_transparency_is_paper():
    night = np.zeros((28, 28), np.uint8)
    night[4:24, 10:16] = 255
    assert to_mnist(Image.fromarray(night)).max() == 255
    rgba = np.zeros((40, 40, 4), np.uint8)  # transparent, with an opaque black stroke
    rgba[5:35, 18:22] = (0, 0, 0, 255)
    digit = to_mnist(Image.fromarray(rgba, "RGBA"))
    assert digit.max() == 255 and digit[0].max() == 0


def test_a_blank_image_has_no_digit():
    with pytest.raises(ValueError, match="no digit found"):
        to_mnist(Image.new("L", (50, 50), 255))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("predict") / "model.pt"
    model, images = MLP([16]).eval(), torch.rand(2, 1, 28, 28)
    export_torchscript(model, path, images, model(images))
    return path


def test_json_output_lists_file_digit_and_probability(model_file, tmp_path, capsys):
    image = np.zeros((28, 28), np.uint8)
    image[4:24, 12:16] = 255
    Image.fromarray(image).save(tmp_path / "one.png")
    assert main(["--model", str(model_file), "--json", str(tmp_path / "one.png")]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert set(result) == {"file", "digit", "probability"}
    assert result["file"] == str(tmp_path / "one.png")
    assert 0 <= result["digit"] <= 9 and 0.1 <= result["probability"] <= 1


def test_unreadable_images_are_reported_and_the_rest_classified(model_file, tmp_path, capsys):
    (tmp_path / "text.png").write_text("not an image")
    Image.new("L", (30, 30), 0).save(tmp_path / "blank.png")
    image = np.zeros((28, 28), np.uint8)
    image[4:24, 12:16] = 255
    Image.fromarray(image).save(tmp_path / "good.png")
    files = [tmp_path / "text.png", tmp_path / "missing.png", tmp_path / "blank.png", tmp_path / "good.png"]
    assert main(["--model", str(model_file), *map(str, files)]) == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"error: {files[0]}: not an image format Pillow can read",
        f"error: {files[1]}: file not found",
        f"error: {files[2]}: no digit found (the image is blank)",
    ]
    assert out.startswith(f"{files[3]}: ") and len(out.splitlines()) == 1


def test_a_missing_or_foreign_model_is_one_line(tmp_path, capsys):
    (tmp_path / "img.png").write_bytes(b"")
    assert main(["--model", str(tmp_path / "absent.pt"), str(tmp_path / "img.png")]) == 1
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path / 'absent.pt'}: model file not found (run `dvc repro`, or pass --model)\n"
    )
    (tmp_path / "other.pt").write_bytes(b"zip? no")
    assert main(["--model", str(tmp_path / "other.pt"), str(tmp_path / "img.png")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'other.pt'}: not a TorchScript model (")
