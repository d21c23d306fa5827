"""The pictures the stages draw: what the model gets most wrong (evaluate), and what augmentation
does to the training digits (train).

Both are digits scaled up pixel for pixel and laid out as tiles on a grid. The mistakes grid
captions each tile (drawn with Pillow) and is a PNG; the augmentation picture is a grey-scale GIF.
Each file is a tracked output that must have the same bytes everywhere, so neither is compressed
by the system's zlib, which Pillow's PNG writer uses (a system whose zlib is zlib-ng, such as
Fedora 40 and later, compresses the same pixels to other bytes): the PNG by the zlib that
torchvision's wheel carries, the GIF by Pillow's own LZW coder.
"""

import functools
import importlib.machinery
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mnist_pipeline.stage import atomic_output

COUNT = 40  # tiles: five rows of eight
COLUMNS = 8
SCALE = 3  # each 28x28 digit drawn at 84x84
CAPTION = 14  # pixels above each digit for "true 7, said 2"
GAP = 4
BACKGROUND = 32  # dark grey
TEXT = (255, 200, 80)


def worst(losses: np.ndarray, count: int = COUNT) -> np.ndarray:
    """Indices of the `count` highest losses, highest first (ties by index, so the choice is stable)."""
    return np.argsort(-losses, kind="stable")[:count]


def tile_grid(tiles: torch.Tensor, columns: int) -> torch.Tensor:
    """uint8 `tiles` [N, C, H, W] laid out `columns` to a row on a BACKGROUND of GAP pixels around
    each, as torchvision.utils.make_grid(tiles, columns, padding=GAP, pad_value=BACKGROUND) does."""
    count, channels, height, width = tiles.shape
    rows = math.ceil(count / columns)
    grid = torch.full(
        (channels, rows * (height + GAP) + GAP, columns * (width + GAP) + GAP), BACKGROUND, dtype=torch.uint8
    )
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        top, left = GAP + row * (height + GAP), GAP + column * (width + GAP)
        grid[:, top : top + height, left : left + width] = tile
    return grid


def captioned(image: np.ndarray, caption: str) -> torch.Tensor:
    """A uint8 [3, H, W] tile: `caption` over the 28x28 `image`, scaled up pixel for pixel."""
    side = image.shape[0] * SCALE
    tile = Image.new("RGB", (side, CAPTION + side), (BACKGROUND,) * 3)
    ImageDraw.Draw(tile).text((0, 0), caption, fill=TEXT)
    tile.paste(Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST).convert("RGB"), (0, CAPTION))
    return torch.from_numpy(np.array(tile)).permute(2, 0, 1)


def mistakes_grid(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, losses: np.ndarray) -> torch.Tensor:
    """A uint8 [3, H, W] picture of the highest-loss digits of uint8 `images` [N, 28, 28], each
    captioned with its true and predicted label."""
    tiles = [captioned(images[i], f"true {labels[i]}, said {predictions[i]}") for i in worst(losses)]
    return tile_grid(torch.stack(tiles), COLUMNS)


def digits_grid(rows: torch.Tensor) -> torch.Tensor:
    """A uint8 [1, H, W] grey-scale picture of the digits `rows` [R, C, 1, 28, 28] (pixels in [0, 1]), as laid out."""
    pixels = rows.flatten(0, 1).cpu().mul(255).round_().to(torch.uint8)
    return tile_grid(pixels.repeat_interleave(SCALE, 2).repeat_interleave(SCALE, 3), rows.shape[1])


# The library of torchvision's image codecs, whose encode_png torchvision.io.encode_png calls. Loaded
# without `import torchvision`, which imports torchvision.ops and through it torch._dynamo: the
# evaluate stage took 3.1 s instead of 1.8 s on synthetic data (Zen 5), for one picture.
# tests/test_metrics.py checks the bytes against torchvision.io.encode_png's, so a torchvision that
# renames the library or the op fails there.
TORCHVISION_IMAGE_LIBRARY = "image_stable"


@functools.cache
def _load_torchvision_image_library() -> None:
    folder = importlib.util.find_spec("torchvision").submodule_search_locations[0]
    extensions = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    spec = importlib.machinery.FileFinder(folder, extensions).find_spec(TORCHVISION_IMAGE_LIBRARY)
    if spec is None:
        raise ImportError(f"torchvision has no {TORCHVISION_IMAGE_LIBRARY} library in {folder}")
    torch.ops.load_library(spec.origin)


def png_bytes(image: torch.Tensor) -> bytes:
    """The uint8 [3, H, W] `image` as a PNG (zlib level 6), as torchvision.io.encode_png writes it."""
    _load_torchvision_image_library()
    return torch.ops.image.encode_png(image, 6).numpy().tobytes()


def write_png(image: torch.Tensor, path: Path) -> None:
    """The uint8 [3, H, W] `image` as a PNG, written atomically; the bytes depend only on the pixels."""
    content = png_bytes(image)
    with atomic_output(path) as file:
        file.write(content)


def write_gif(image: torch.Tensor, path: Path) -> None:
    """The uint8 [1, H, W] grey-scale `image` as a GIF (lossless: 256 greys), written atomically;
    the bytes depend only on the pixels."""
    with atomic_output(path) as file:
        Image.fromarray(image[0].numpy()).save(file, format="GIF")
