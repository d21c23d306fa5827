"""A picture of what the model gets most wrong: the test digits with the highest loss, labelled.

Each digit becomes a tile (its caption above it, drawn with Pillow) and torchvision.utils.make_grid
lays the tiles out. Importing torchvision costs the evaluate stage about 1.3 s, because
torchvision.ops imports torch._dynamo (docs/performance.md).

The PNG is compressed by torchvision's own zlib, which its wheel carries, and not by Pillow,
which uses the system's: a system whose zlib is zlib-ng (Fedora 40 and later) compresses the same
pixels to other bytes, and the file is a tracked output that must be the same everywhere.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.io import encode_png
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import make_grid

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


def captioned(image: np.ndarray, caption: str) -> torch.Tensor:
    """A uint8 [3, H, W] tile: `caption` over the 28x28 `image`, scaled up pixel for pixel."""
    side = image.shape[0] * SCALE
    tile = Image.new("RGB", (side, CAPTION + side), (BACKGROUND,) * 3)
    ImageDraw.Draw(tile).text((0, 0), caption, fill=TEXT)
    tile.paste(Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST).convert("RGB"), (0, CAPTION))
    return pil_to_tensor(tile)


def mistakes_grid(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, losses: np.ndarray) -> torch.Tensor:
    """A uint8 [3, H, W] picture of the highest-loss digits of uint8 `images` [N, 28, 28], each
    captioned with its true and predicted label."""
    tiles = [captioned(images[i], f"true {labels[i]}, said {predictions[i]}") for i in worst(losses)]
    return make_grid(tiles, nrow=COLUMNS, padding=GAP, pad_value=BACKGROUND)


def write_png(image: torch.Tensor, path: Path) -> None:
    """The uint8 [3, H, W] `image` as a PNG, written atomically; the bytes depend only on the pixels."""
    content = encode_png(image, compression_level=6).numpy().tobytes()
    with atomic_output(path) as file:
        file.write(content)
