"""mnist-predict: classify image files with the exported TorchScript model (and nothing else of ours).

uv run mnist-predict digit.png photo.jpg [--model models/model.pt] [--json]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mnist_pipeline.torchscript import load_torchscript

DIGIT_BOX = 20  # MNIST fits each digit into 20x20 pixels...
CANVAS = 28  # ...and puts its centre of mass at (14, 14) in 28x28.
INK_THRESHOLD = 0.1  # fraction of the brightest pixel that counts as part of the digit


def to_mnist(image: Image.Image) -> np.ndarray:
    """Any picture of one digit -> uint8 [28, 28], light digit on black, prepared the way MNIST was."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent areas are paper: composite onto white before going grey.
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 127:  # dark ink on light paper: MNIST digits are light on dark
        pixels = 255 - pixels
        border = 255 - border
    pixels = np.clip(pixels - np.median(border), 0, None)  # the background becomes black
    if pixels.max() == 0:
        raise ValueError("no digit found (the image is blank)")
    rows, cols = np.nonzero(pixels > INK_THRESHOLD * pixels.max())
    digit = pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
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


def read_digit(path: Path) -> np.ndarray:
    """The image at `path` prepared like MNIST; ValueError with a short reason if it cannot be used."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_mnist(image)
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except UnidentifiedImageError:
        raise ValueError("not an image format Pillow can read") from None
    except OSError as error:
        raise ValueError(f"cannot read image ({error})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-predict", description="Classify handwritten digits in image files.")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG, JPEG, PGM, ... of any size")
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"), help="TorchScript model file")
    parser.add_argument("--json", action="store_true", help='print [{"file", "digit", "probability"}, ...]')
    args = parser.parse_args(argv)

    if not args.model.is_file():
        print(f"error: {args.model}: model file not found (run `dvc repro`, or pass --model)", file=sys.stderr)
        return 1
    try:
        model = load_torchscript(args.model)
    except RuntimeError as error:
        print(f"error: {args.model}: not a TorchScript model ({str(error).splitlines()[0]})", file=sys.stderr)
        return 1

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
