"""A picture of what the model gets most wrong: the test digits with the highest loss, labelled.

Drawn with numpy and Pillow rather than torchvision.utils.make_grid: importing torchvision
imports torch._dynamo (through torchvision.ops), 1.6-2 s and about 1,100 modules on top of torch,
which would more than double the evaluate stage's time for a 40-tile image.
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mnist_pipeline.stage import atomic_output

COUNT = 40  # tiles: five rows of eight
COLUMNS = 8
SCALE = 3  # each 28x28 digit drawn at 84x84
CAPTION = 14  # pixels above each digit for "true 7, said 2"
GAP = 4
BACKGROUND = (32, 32, 32)
TEXT = (255, 200, 80)


def worst(losses: np.ndarray, count: int = COUNT) -> np.ndarray:
    """Indices of the `count` highest losses, highest first (ties by index, so the choice is stable)."""
    return np.argsort(-losses, kind="stable")[:count]


def mistakes_grid(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, losses: np.ndarray) -> Image.Image:
    """The highest-loss digits of uint8 `images` [N, 28, 28], each captioned with its true and predicted label."""
    chosen = worst(losses)
    side = images.shape[1] * SCALE
    rows = -(-len(chosen) // COLUMNS)
    grid = Image.new("RGB", (COLUMNS * (side + GAP) + GAP, rows * (side + CAPTION + GAP) + GAP), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for tile, index in enumerate(chosen):
        row, column = divmod(tile, COLUMNS)
        left, top = GAP + column * (side + GAP), GAP + row * (side + CAPTION + GAP)
        draw.text((left, top), f"true {labels[index]}, said {predictions[index]}", fill=TEXT)
        digit = Image.fromarray(images[index]).resize((side, side), Image.Resampling.NEAREST)
        grid.paste(digit.convert("RGB"), (left, top + CAPTION))
    return grid


def write_png(image: Image.Image, path: Path) -> None:
    """`image` as a PNG, written atomically; the bytes depend only on the pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    with atomic_output(path) as file:
        file.write(buffer.getvalue())
