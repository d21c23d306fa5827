import errno
import io
import json
import os
import re
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import export_files, idx_bytes, synthetic_split
from PIL import Image, ImageDraw

from mnist_pipeline.data import MNIST_FILES
from mnist_pipeline.export import DigitClassifier, model_card
from mnist_pipeline.model import MLP, Checkpoint
from mnist_pipeline.predict import main, read_digit, to_mnist


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
    directory = tmp_path_factory.mktemp("predict")
    export_files(MLP([16]).eval(), directory, torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8))
    return directory / "model.pt"


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


def seven() -> np.ndarray:
    """A 7 drawn the way MNIST digits look: light on black, soft edges, uint8 [28, 28]."""
    canvas = Image.new("L", (112, 112), 0)
    ImageDraw.Draw(canvas).line([(24, 20), (88, 20), (48, 96)], fill=255, width=14)
    return np.asarray(canvas.resize((28, 28), Image.Resampling.LANCZOS))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def black_png(path: Path, width: int, height: int) -> None:
    """A valid all-black 1-bit PNG; 20000x20000 takes 50 kB: how decompression bombs are made."""
    row = bytes(1 + (width + 7) // 8)  # filter type 0, then 8 pixels a byte
    block = max(1, (1 << 20) // len(row))
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * min(block, height - top)) for top in range(0, height, block))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale, no interlace
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat + compressor.flush()) + png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def encoded(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def truncated_png(path: Path) -> None:
    """The 7 as a PNG that ends halfway through its pixel data."""
    data = encoded(Image.fromarray(seven()), "PNG")
    idat = data.index(b"IDAT")
    path.write_bytes(data[: idat + 4 + struct.unpack(">I", data[idat - 4 : idat])[0] // 2])


def corrupt_lzw_tiff(path: Path) -> None:
    """The 7 as an LZW TIFF whose compressed strip is garbage from the middle on: libtiff's to decode."""
    data = bytearray(encoded(Image.fromarray(seven()), "TIFF", compression="tiff_lzw"))
    with Image.open(io.BytesIO(data)) as image:
        [offset], [length] = image.tag_v2[273], image.tag_v2[279]  # StripOffsets, StripByteCounts
    data[offset + length // 2 : offset + length] = b"\xff" * (length - length // 2)
    path.write_bytes(data)


def impossible_tiff(path: Path) -> None:
    """A CMYK TIFF claiming 122 samples a pixel, which Pillow logs as well as refusing."""
    data = bytearray(encoded(Image.new("CMYK", (8, 8)), "TIFF"))
    assert data[:4] == b"II*\0"  # little-endian
    [ifd] = struct.unpack_from("<I", data, 4)
    [count] = struct.unpack_from("<H", data, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if struct.unpack_from("<HH", data, entry) == (277, 3):  # SamplesPerPixel, a SHORT
            struct.pack_into("<H", data, entry + 8, 122)
    path.write_bytes(data)


def broken_spider(path: Path) -> None:
    """A SPIDER header naming an image inside a stack of none: AttributeError inside Pillow 13's parser."""
    data = bytearray(encoded(Image.new("F", (8, 8)), "SPIDER"))
    order = "<" if data[:4] == struct.pack("<f", 1) else ">"  # the first value, the number of slices, is 1
    struct.pack_into(f"{order}f", data, 26 * 4, 1.0)  # the image number, with no stack
    path.write_bytes(data)


# What mnist-predict says about each kind of unusable file, as a regular expression.
UNUSABLE = {
    "bomb.png": (
        lambda path: black_png(path, 20000, 20000),
        r"image too large: its header declares over [\d.]+ megapixels, the limit is 40 megapixels",
    ),
    "over-pillow-warning.png": (  # Pillow warns, rather than refusing, from 89.5 to 179 MP
        lambda path: black_png(path, 10000, 10000),
        r"image too large: its header declares over [\d.]+ megapixels, the limit is 40 megapixels",
    ),
    "over-our-limit.png": (
        lambda path: black_png(path, 8000, 6000),
        r"image too large: 8000x6000 pixels \(48 megapixels\), the limit is 40 megapixels",
    ),
    # Small, from the same maker: Pillow reads it, so the three above are whole images, not just headers.
    "black.png": (lambda path: black_png(path, 30, 20), r"no digit found \(the image is blank\)"),
    "truncated.png": (truncated_png, r"cannot decode image \(image file is truncated.*\)"),
    "random.png": (
        lambda path: path.write_bytes(np.random.default_rng(0).bytes(1000)),
        "not an image format Pillow can read",
    ),
    "empty.png": (lambda path: path.write_bytes(b""), "empty file"),
    "directory.png": (lambda path: path.mkdir(), "is a directory, not an image file"),
    "corrupt-lzw.tif": (corrupt_lzw_tiff, r"cannot decode image \(.+\)"),
    "impossible.tif": (impossible_tiff, "not an image format Pillow can read"),
    "broken.spi": (broken_spider, r"cannot decode image \(.+\)|not an image format Pillow can read"),
    "drawing.eps": (
        lambda path: path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"),
        r"EPS is not read \(Pillow would run Ghostscript on it\)",
    ),
}


@pytest.fixture(scope="module")
def unusable(tmp_path_factory) -> dict[str, Path]:
    """Each kind of unusable file, written once."""
    directory = tmp_path_factory.mktemp("unusable")
    for name, (write, _) in UNUSABLE.items():
        write(directory / name)
    return {name: directory / name for name in UNUSABLE}


@pytest.mark.parametrize("name", UNUSABLE)
def test_an_unusable_file_is_a_one_line_reason_and_nothing_else(name, unusable, capfd):
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError) as error:
        warnings.simplefilter("always")
        read_digit(unusable[name])
    assert re.fullmatch(UNUSABLE[name][1], str(error.value))
    assert caught == []  # no Python warning...
    assert capfd.readouterr() == ("", "")  # ...and nothing from C libraries (libtiff) on stderr


def test_a_file_that_cannot_be_opened_is_one_line(tmp_path, monkeypatch):
    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "open", denied)  # chmod 000 would not stop root, who runs many CIs
    with pytest.raises(ValueError, match=r"^cannot open \(Permission denied\)$"):
        read_digit(tmp_path / "secret.png")


def test_deep_greyscale_is_scaled_not_clipped(model_file, tmp_path, capsys):
    digit = seven()
    files = {
        "8-bit.png": Image.fromarray(digit),
        "16-bit.png": Image.fromarray(digit.astype(np.uint16) * 257),  # mode I;16
        "16-bit-big-endian.tif": Image.frombytes("I;16B", (28, 28), (digit.astype(">u2") * 257).tobytes()),
        "16-bit.pgm": Image.fromarray(digit.astype(np.uint16) * 257),  # Pillow reads it as mode I
        "0-to-1.tif": Image.fromarray(digit / np.float32(255)),  # mode F
        "0-to-255.tif": Image.fromarray(digit.astype(np.float32)),
        "not-a-number.tif": Image.fromarray(np.where(digit > 0, digit / np.float32(255), np.nan)),
        # Mode I beyond 16 bits, scaled by its brightest pixel: white paper, not near-black in 32 bits.
        "32-bit-dark-on-light.tif": Image.fromarray((255 - digit.astype(np.int32)) << 12),
        "16-bit-dark-on-light.png": Image.fromarray((255 - digit.astype(np.uint16)) * 257),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    expected = read_digit(tmp_path / "8-bit.png")
    for name in files:  # convert("L") clipped or truncated most of these
        assert np.abs(read_digit(tmp_path / name).astype(int) - expected).max() <= 1, name
    assert main(["--model", str(model_file), "--json", *(str(tmp_path / name) for name in files)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {(result["digit"], result["probability"]) for result in results} == {
        (results[0]["digit"], results[0]["probability"])
    }


def test_a_see_through_grey_level_in_a_16_bit_png_is_paper(tmp_path):
    pixels = np.full((40, 40), 1000, np.uint16)
    pixels[5:35, 18:22] = 0  # a black stroke on see-through dark grey
    Image.fromarray(pixels).save(tmp_path / "stroke.png", transparency=1000)
    digit = read_digit(tmp_path / "stroke.png")
    assert digit.max() == 255 and digit[0].max() == 0


def test_cielab_is_read_by_its_lightness(tmp_path):
    Image.fromarray(seven()).save(tmp_path / "grey.png")
    Image.fromarray(255 - seven()).convert("RGB").convert("LAB").save(tmp_path / "lab.tif")
    # Lightness is not linear in grey levels, so the two differ a little at the edges of the strokes.
    difference = read_digit(tmp_path / "lab.tif").astype(int) - read_digit(tmp_path / "grey.png")
    assert np.abs(difference).max() <= 16


@pytest.mark.parametrize("format", ["GIF", "PNG", "TIFF"])
def test_an_animation_counts_by_its_first_frame(format, tmp_path):
    digit, black = Image.fromarray(seven()), Image.new("L", (28, 28))
    digit.save(tmp_path / "digit-first", format, save_all=True, append_images=[black])
    black.save(tmp_path / "black-first", format, save_all=True, append_images=[digit])
    assert np.array_equal(read_digit(tmp_path / "digit-first"), to_mnist(digit))
    with pytest.raises(ValueError, match="no digit found"):
        read_digit(tmp_path / "black-first")


def test_the_size_limit_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Images over 40 megapixels are refused" in " ".join(capsys.readouterr().out.split())


def mislabelled_icon(path: Path) -> None:
    """The 7 in an icon whose header says 16x16: Pillow warns, and reads it anyway."""
    picture = encoded(Image.fromarray(seven()), "PNG")
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 8, len(picture), 6 + 16)
    path.write_bytes(struct.pack("<HHH", 0, 1, 1) + entry + picture)


def test_what_pillow_warns_about_a_usable_file_is_not_shown(tmp_path):
    mislabelled_icon(tmp_path / "icon.ico")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        digit = read_digit(tmp_path / "icon.ico")
    assert caught == []
    assert np.array_equal(digit, to_mnist(Image.fromarray(seven())))


@pytest.fixture
def mixed_batch(unusable, tmp_path) -> tuple[list[Path], list[Path]]:
    """Every unusable file and a missing one, with good files before, between and after them."""
    digit = seven()
    good = [tmp_path / "first.png", tmp_path / "16-bit.png", tmp_path / "icon.ico", tmp_path / "last.gif"]
    Image.fromarray(digit).save(good[0])
    Image.fromarray(digit.astype(np.uint16) * 257).save(good[1])
    mislabelled_icon(good[2])
    Image.fromarray(digit).save(good[3], save_all=True, append_images=[Image.new("L", (28, 28))])
    bad = [*unusable.values(), tmp_path / "missing.png"]
    return [good[0], *bad[:6], good[1], good[2], *bad[6:], good[3]], good


def expected_errors(files: list[Path]) -> list[str]:
    reasons = {name: reason for name, (_, reason) in UNUSABLE.items()} | {"missing.png": "file not found"}
    return [f"error: {re.escape(str(path))}: (?:{reasons[path.name]})" for path in files if path.name in reasons]


def test_a_mixed_batch_gets_one_line_per_bad_file_and_results_for_the_rest(model_file, mixed_batch, capsys):
    files, good = mixed_batch
    assert main(["--model", str(model_file), *map(str, files)]) == 1
    out, err = capsys.readouterr()
    assert [line.split(": ")[0] for line in out.splitlines()] == list(map(str, good))
    errors = err.splitlines()
    assert len(errors) == len(expected_errors(files))
    assert all(map(re.fullmatch, expected_errors(files), errors)), errors


def test_the_real_command_on_a_mixed_batch(model_file, mixed_batch):
    files, good = mixed_batch
    command = [str(Path(sys.executable).parent / "mnist-predict"), "--model", str(model_file), "--json"]
    result = subprocess.run([*command, *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = result.stderr.splitlines()
    assert len(errors) == len(expected_errors(files)), result.stderr
    assert all(map(re.fullmatch, expected_errors(files), errors)), result.stderr
    assert [entry["file"] for entry in json.loads(result.stdout)] == list(map(str, good))


@pytest.fixture(scope="module")
def card_and_data(tmp_path_factory):
    """A model's files and its card as the export stage writes them, beside a synthetic test set, the
    plain float32 TorchScript of the same weights, and the card's logits hash and accuracy."""
    directory = tmp_path_factory.mktemp("check")
    images, labels = synthetic_split(300, seed=6)
    (directory / "data").mkdir()
    for name, array in zip(MNIST_FILES["test"], (images, labels), strict=True):
        (directory / "data" / name).write_bytes(idx_bytes(array))
    torch.manual_seed(2)
    model = MLP([64, 32]).eval()
    logits = export_files(model, directory, torch.from_numpy(images))
    artifacts = {"torchscript": directory / "model.pt", "torch_export": directory / "model.pt2"}
    accuracy = (logits.argmax(1).numpy() == labels).mean().item()
    card = model_card(Checkpoint(model, {}), {"loss": 0.5, "accuracy": accuracy}, artifacts, logits)
    (directory / "model.json").write_text(json.dumps(card))
    torch.jit.save(torch.jit.script(DigitClassifier(model)), directory / "plain.pt")
    return directory, card["test_logits"]["sha256"], accuracy


def check(directory: Path, *arguments: str) -> list[str]:
    return ["--check", "--data", str(directory / "data"), *arguments]


def test_check_shows_the_cards_logits_and_this_machines_in_one_batch_and_one_at_a_time(card_and_data, capsys):
    directory, sha256, accuracy = card_and_data
    assert main([*check(directory), "--model", str(directory / "model.pt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:3]] == [str(directory / "model.json"), "batch", "batch"]
    assert lines[1].startswith("batch 300 ") and lines[2].startswith("batch 1 ")
    assert all(line.endswith(f"accuracy {accuracy}  logits sha256 {sha256}") for line in lines[:3])
    assert lines[3] == f"this machine computes the logits {directory / 'model.json'} records, in any batch"


def test_check_fails_on_a_card_of_other_logits_and_on_a_plain_float32_model(card_and_data, tmp_path, capsys):
    """The negative controls: a card whose hash is another's, and the same weights computed by torch's
    own float32 products, which give other logits than the card's."""
    directory, sha256, _ = card_and_data
    card = json.loads((directory / "model.json").read_text())
    card["test_logits"]["sha256"] = sha256[::-1]
    (tmp_path / "other.json").write_text(json.dumps(card))
    model = str(directory / "model.pt")
    assert main([*check(directory), "--model", model, "--card", str(tmp_path / "other.json")]) == 1
    assert (
        capsys.readouterr().err == f"error: this machine computes other logits than {tmp_path / 'other.json'} records\n"
    )
    plain = ["--model", str(directory / "plain.pt"), "--card", str(directory / "model.json")]
    assert main([*check(directory), *plain]) == 1
    output = capsys.readouterr()
    assert output.err == f"error: this machine computes other logits than {directory / 'model.json'} records\n"
    assert sha256 not in output.out.splitlines()[1]


def test_check_without_a_card_or_the_test_set_is_one_line(card_and_data, tmp_path, capsys):
    directory, _, _ = card_and_data
    model = ["--model", str(directory / "model.pt")]
    assert main([*check(directory), *model, "--card", str(tmp_path / "missing.json")]) == 1
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path / 'missing.json'}: cannot read the model card (No such file or directory)\n"
    )
    (tmp_path / "foreign.json").write_text('{"metrics": {}}')
    assert main([*check(directory), *model, "--card", str(tmp_path / "foreign.json")]) == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'foreign.json'}: not a model card with metrics.accuracy and test_logits.sha256\n"
    )
    assert main(["--check", "--data", str(tmp_path), *model]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: {tmp_path / 't10k-images-idx3-ubyte'}: file not found")
    assert error.endswith("; --data takes the folder of the decompressed MNIST IDX files\n")
    card = json.loads((directory / "model.json").read_text())
    card["metrics"]["accuracy"] = 0.5
    (tmp_path / "other accuracy.json").write_text(json.dumps(card))
    assert main([*check(directory), *model, "--card", str(tmp_path / "other accuracy.json")]) == 1
    assert capsys.readouterr().err == (
        f"error: the card's logits score {card_and_data[2]} on the labels in {directory / 'data'}, not 0.5\n"
    )


def test_check_and_images_do_not_go_together(card_and_data, capsys):
    directory, _, _ = card_and_data
    with pytest.raises(SystemExit):
        main(["--check", str(directory / "digit.png")])
    assert "give IMAGE files to classify, or --check alone" in capsys.readouterr().err
