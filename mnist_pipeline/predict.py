"""mnist-predict: classify image files with the exported TorchScript model (and nothing else of ours),
or check that this machine computes the logits its model card records.

uv run mnist-predict digit.png photo.jpg [--model models/model.pt] [--json]
uv run mnist-predict --check [--model models/model.pt] [--card models/model.json] [--data data/mnist]

Any format Pillow reads, in any mode: 16-bit and floating-point greyscale is scaled to 8 bits, not
clipped, and an animation counts by its first frame. Images over MAX_PIXELS (40 megapixels) are
refused by the size their header states, undecoded (but for icons, see decode). Each file that cannot
be used gets one line `error: FILE: reason` on stderr; the others are still classified, and the exit
status is 1.
"""

import argparse
import json
import os
import stat
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mnist_pipeline.data import load_mnist
from mnist_pipeline.shipped import logits_sha256
from mnist_pipeline.stage import PipelineError
from mnist_pipeline.torchscript import load_torchscript

DIGIT_BOX = 20  # MNIST fits each digit into 20x20 pixels...
CANVAS = 28  # ...and puts its centre of mass at (14, 14) in 28x28.
INK_THRESHOLD = 0.1  # fraction of the brightest pixel that counts as part of the digit
# A 12-24 MP photo or an A4 page scanned at 600 dpi (35 MP) fits. Preparing an image peaks at about
# 15 bytes a pixel (decoded RGBA, float32 copies), 600 MB at the limit. Pillow's own limit against
# decompression bombs (89 MP, an error from 179 MP) is meant for operations that cost less per pixel.
MAX_PIXELS = 40_000_000
# "I" (32-bit integers) and "F" (floats) have no range of their own: Pillow opens 16-bit PGM as "I", and
# float images usually hold 0..1 or 0..255. So white is the smallest of these that holds the brightest
# pixel, or else that pixel itself.
FULL_SCALES = (1, 255, 65535)


def greyscale(image: Image.Image) -> np.ndarray:
    """Float32 grey levels from 0 (black) to 255 (white), deep modes scaled, transparent areas white."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # convert("L") would clip these to 0..255. NaN and infinities (a float TIFF can hold them) and
        # negative values are black.
        values = np.nan_to_num(np.asarray(image, np.float32), nan=0, posinf=0, neginf=0).clip(0, None)
        brightest = float(values.max())
        white = 65535 if image.mode.startswith("I;16") else next((s for s in FULL_SCALES if brightest <= s), brightest)
        grey = values / np.float32(white / 255)  # 257 for 16 bits: 8-bit values times 257 come back exact
        if "transparency" in image.info:  # a grey level that is see-through, as in a 16-bit PNG
            grey[np.asarray(image) == image.info["transparency"]] = 255
        return grey
    if image.mode == "LAB":  # CIELab converts to no other mode; its first channel is the lightness
        return np.asarray(image.getchannel("L"), np.float32)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent areas are paper: composite onto white before going grey.
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return np.asarray(image.convert("L"), np.float32)


def to_mnist(image: Image.Image) -> np.ndarray:
    """Any picture of one digit -> uint8 [28, 28], light digit on black, prepared the way MNIST was."""
    pixels = greyscale(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 127:  # dark ink on light paper: MNIST digits are light on dark
        pixels = 255 - pixels
        border = 255 - border
    pixels = np.clip(pixels - np.median(border), 0, None)  # the background becomes black
    if pixels.max() == 0:
        raise ValueError("no digit found (the image is blank)")
    # The rows and columns with ink, rather than np.nonzero's 16 bytes for each inked pixel of a photo.
    ink = pixels > INK_THRESHOLD * pixels.max()
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    digit = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    digit = digit * (255 / digit.max())
    scale = DIGIT_BOX / max(digit.shape)
    height, width = (max(1, round(n * scale)) for n in digit.shape)
    resized = np.asarray(
        Image.fromarray(digit.astype(np.uint8)).resize((width, height), Image.Resampling.LANCZOS), np.float32
    )
    total = resized.sum()
    centre_row = (resized.sum(axis=1) * np.arange(height)).sum() / total
    centre_col = (resized.sum(axis=0) * np.arange(width)).sum() / total
    top = int(np.clip(round(CANVAS / 2 - centre_row), 0, CANVAS - height))
    left = int(np.clip(round(CANVAS / 2 - centre_col), 0, CANVAS - width))
    canvas = np.zeros((CANVAS, CANVAS), np.uint8)
    canvas[top : top + height, left : left + width] = resized.astype(np.uint8)
    return canvas


def megapixels(pixels: int) -> str:
    """`pixels` for a message, e.g. '40 megapixels'."""
    return f"{pixels / 1e6:.3g} megapixels"


@contextmanager
def stderr_silenced() -> Iterator[None]:
    """Send whatever is written to file descriptor 2 meanwhile, by C libraries too, to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def decoding() -> Iterator[None]:
    """Turn what Pillow raises for a file it cannot use into a ValueError with a one-line reason."""
    # A broken file makes libtiff print its complaints, and Pillow log some of its own (which Python
    # prints when logging is not set up), on top of the error raised: more lines for the same file.
    with stderr_silenced(), warnings.catch_warnings():
        # Pillow warns about oddities it works around (corrupt EXIF, an icon of another size than its
        # header says): the image is still usable, and a warning would be a second line for the file.
        warnings.simplefilter("ignore")
        # Its decompression-bomb warning is a refusal, though: Image.open warns from the header (the
        # image is then over MAX_PIXELS too), loading for an image nested in the file or a large frame.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except UnidentifiedImageError:
            raise ValueError("not an image format Pillow can read") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(
                f"image too large: its header declares over {megapixels(Image.MAX_IMAGE_PIXELS)}, "
                f"the limit is {megapixels(MAX_PIXELS)}"
            ) from None
        # Anything else too, but only from Pillow's calls in the block. Its plugins parse most formats
        # in Python, so a hostile file makes them raise whatever the parsing trips over: OSError for
        # truncated data, SyntaxError or ValueError for a broken header, EOFError or struct.error for a
        # short one, MemoryError, ... and AttributeError for a broken SPIDER header when we fuzzed
        # Pillow 13. Pillow's own fuzzer catches Exception for the same reason (fuzz_pillow.py).
        except Exception as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(f"cannot decode image ({reason})") from None


def check_size(image: Image.Image) -> None:
    """ValueError if `image` has more than MAX_PIXELS pixels."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"image too large: {width}x{height} pixels ({megapixels(width * height)}), "
            f"the limit is {megapixels(MAX_PIXELS)}"
        )


def decode(file: BinaryIO) -> Image.Image:
    """The first frame of the image in `file`, decoded; ValueError with a short reason if it cannot be used."""
    with decoding():
        # Reads the header only, but for an icon (ICO): Pillow decodes that here, within its own limit.
        image = Image.open(file)
    check_size(image)
    if image.format == "EPS":  # loading it runs Ghostscript, which crafted files have exploited
        raise ValueError("EPS is not read (Pillow would run Ghostscript on it)")
    with decoding():
        image.load()
    return image


def read_digit(path: Path) -> np.ndarray:
    """The image at `path` prepared like MNIST; ValueError with a short reason if it cannot be used."""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except IsADirectoryError:
        raise ValueError("is a directory, not an image file") from None
    except OSError as error:  # permission denied, a loop of symbolic links, ...
        raise ValueError(f"cannot open ({error.strerror})") from None
    with file:
        status = os.fstat(file.fileno())
        if stat.S_ISREG(status.st_mode) and status.st_size == 0:  # not a pipe, whose size is always 0
            raise ValueError("empty file")
        with decode(file) as image:
            return to_mnist(image)


def check(model: torch.jit.ScriptModule, card: Path, data: Path) -> int:
    """Print the card's test accuracy and logits hash, then this machine's, from the whole test set in one
    batch and one image at a time; 0 if all agree, else 1 (with one error line)."""
    try:
        recorded = json.loads(card.read_text())
        expected = (recorded["metrics"]["accuracy"], recorded["test_logits"]["sha256"])
    except OSError as error:
        print(f"error: {card}: cannot read the model card ({error.strerror})", file=sys.stderr)
        return 1
    except (ValueError, KeyError, TypeError):
        print(f"error: {card}: not a model card with metrics.accuracy and test_logits.sha256", file=sys.stderr)
        return 1
    try:
        images, labels = (torch.from_numpy(array) for array in load_mnist(data, "test"))
    except PipelineError as error:
        print(f"error: {error}; --data takes the folder of the decompressed MNIST IDX files", file=sys.stderr)
        return 1
    with torch.no_grad():
        computed = {
            f"batch {len(images)}": model(images),
            "batch 1": torch.cat([model(images[i : i + 1]) for i in range(len(images))]),
        }
    rows = {str(card): expected} | {
        name: ((logits.argmax(1) == labels).sum().item() / len(labels), logits_sha256(logits))
        for name, logits in computed.items()
    }
    width = max(map(len, rows))
    for name, (accuracy, sha256) in rows.items():
        print(f"{name:<{width}}  accuracy {accuracy}  logits sha256 {sha256}")
    if any(sha256 != expected[1] for _, sha256 in rows.values()):
        print(f"error: this machine computes other logits than {card} records", file=sys.stderr)
        return 1
    scored = rows[f"batch {len(images)}"][0]
    if scored != expected[0]:
        print(f"error: the card's logits score {scored} on the labels in {data}, not {expected[0]}", file=sys.stderr)
        return 1
    print(f"this machine computes the logits {card} records, in any batch")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-predict",
        description="Classify handwritten digits in image files.",
        epilog=f"Images over {megapixels(MAX_PIXELS)} are refused before they are decoded. 16-bit and "
        "floating-point greyscale is scaled to 8 bits; an animation counts by its first frame. "
        "Each unusable file gets one 'error: FILE: reason' line on stderr, the others are still "
        "classified, and the exit status is then 1.",
    )
    parser.add_argument(
        "images",
        nargs="*",
        type=Path,
        metavar="IMAGE",
        help=f"PNG, JPEG, TIFF, PGM, ... up to {megapixels(MAX_PIXELS)}",
    )
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"), help="TorchScript model file")
    parser.add_argument("--json", action="store_true", help='print [{"file", "digit", "probability"}, ...]')
    parser.add_argument(
        "--check",
        action="store_true",
        help="score the MNIST test set in one batch and one image at a time, and compare the accuracy and the "
        "sha256 of the logits with the model card's; the exit status is 1 if they differ",
    )
    parser.add_argument("--card", type=Path, help="model card for --check (default: the model's, MODEL with .json)")
    parser.add_argument(
        "--data", type=Path, default=Path("data/mnist"), help="folder of the MNIST test IDX files, for --check"
    )
    args = parser.parse_args(argv)
    if bool(args.images) == args.check:
        parser.error("give IMAGE files to classify, or --check alone")

    if not args.model.is_file():
        print(f"error: {args.model}: model file not found (run `dvc repro`, or pass --model)", file=sys.stderr)
        return 1
    try:
        model = load_torchscript(args.model)
    except RuntimeError as error:
        print(f"error: {args.model}: not a TorchScript model ({str(error).splitlines()[0]})", file=sys.stderr)
        return 1

    if args.check:
        return check(model, args.card or args.model.with_suffix(".json"), args.data)
    digits, files, failed = [], [], False
    for path in args.images:
        try:
            digits.append(read_digit(path))
            files.append(path)
        except ValueError as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            failed = True
    results = []
    if digits:
        with torch.no_grad():
            probabilities = model.probabilities(torch.from_numpy(np.stack(digits)))
        best, digit = probabilities.max(dim=1)
        results = [
            {"file": str(path), "digit": int(d), "probability": round(float(p), 6)}
            for path, d, p in zip(files, digit, best, strict=True)
        ]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(f"{result['file']}: {result['digit']} (probability {result['probability']:.3f})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
