import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PROJECT
from torch import nn
from torchvision.io import encode_png
from torchvision.utils import make_grid

from mnist_pipeline.metrics import EVAL_BATCH_SIZE, evaluate, per_class_accuracy
from mnist_pipeline.pictures import BACKGROUND, CAPTION, COLUMNS, GAP, SCALE, mistakes_grid, tile_grid, worst


class FixedLogits(nn.Module):
    """Ignores the pixels: sample i (its index is stored in the input) gets logits[i]."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0].long()]


def indices(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).unsqueeze(1)


def test_loss_and_accuracy_match_hand_computed_values():
    logits = torch.zeros(3, 10)
    logits[1, 2] = math.log(9)  # p(2) = 9 / (9 + 9) = 1/2
    logits[2, 5] = 100.0  # p(5) ~ 1
    labels = torch.tensor([3, 2, 5])
    # Sample 0: uniform over 10 classes -> loss ln 10, predicted 0 (wrong).
    # Sample 1: loss ln 2, predicted 2 (right). Sample 2: loss ~0, predicted 5 (right).
    result = evaluate(FixedLogits(logits), indices(3), labels)
    assert result.loss == pytest.approx((math.log(10) + math.log(2)) / 3, rel=1e-6)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.predictions.tolist() == [0, 2, 5]


def test_loss_is_the_mean_per_sample_not_per_batch():
    # More samples than one evaluation batch, with a short last batch: the tutorial's
    # sum-of-batch-means / N would come out about EVAL_BATCH_SIZE times too small.
    n = EVAL_BATCH_SIZE + 7
    logits = torch.zeros(n, 10)
    logits[EVAL_BATCH_SIZE:, 0] = math.log(9)  # the last 7 samples: loss ln 2 on label 0
    labels = torch.zeros(n, dtype=torch.int64)
    # The first EVAL_BATCH_SIZE samples: uniform logits, loss ln 10, predicted 0 = label (ties go to 0).
    result = evaluate(FixedLogits(logits), indices(n), labels)
    expected = (EVAL_BATCH_SIZE * math.log(10) + 7 * math.log(2)) / n
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.accuracy == 1.0


def test_per_class_accuracy():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 2, 2])
    accuracy = per_class_accuracy(labels, predictions)
    assert accuracy[:3].tolist() == [0.5, 2 / 3, 1.0]
    assert np.isnan(accuracy[3:]).all() and len(accuracy) == 10


def test_evaluation_reports_each_samples_loss_and_scales_uint8_images_itself():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    images = torch.randint(0, 256, (EVAL_BATCH_SIZE + 3, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (EVAL_BATCH_SIZE + 3,))
    from_uint8 = evaluate(model, images, labels)
    from_float = evaluate(model, images.float() / 255, labels)
    assert from_uint8.losses.tolist() == from_float.losses.tolist()
    expected = torch.nn.functional.cross_entropy(model(images.float() / 255), labels, reduction="none")
    np.testing.assert_allclose(from_uint8.losses, expected.detach().numpy(), rtol=1e-6)
    assert from_uint8.loss == pytest.approx(from_uint8.losses.astype(np.float64).mean(), rel=1e-9)


def test_the_mistakes_grid_shows_the_highest_losses_first_with_their_labels():
    losses = np.array([0.1, 5.0, 0.2, 5.0, 3.0])
    assert worst(losses, 3).tolist() == [1, 3, 4]  # ties keep their order
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
    labels, predictions, losses = np.arange(60) % 10, (np.arange(60) + 1) % 10, rng.random(60)
    grid = mistakes_grid(images, labels, predictions, losses).permute(1, 2, 0).numpy()
    side = 28 * SCALE
    assert grid.shape == (5 * (side + CAPTION + GAP) + GAP, COLUMNS * (side + GAP) + GAP, 3)  # COUNT = 40 tiles
    # The first tile is the highest-loss digit, scaled up pixel for pixel, under its caption.
    top = int(np.argmax(losses))
    tile = grid[GAP + CAPTION : GAP + CAPTION + side, GAP : GAP + side, 0]
    assert np.array_equal(tile, images[top].repeat(SCALE, axis=0).repeat(SCALE, axis=1))
    caption = grid[GAP : GAP + CAPTION, GAP : GAP + side]
    assert (caption != BACKGROUND).any()  # the caption's text


@pytest.mark.parametrize(("count", "channels"), [(40, 3), (50, 1), (7, 1)])
def test_the_tiles_are_laid_out_as_torchvision_lays_them_out(count, channels):
    tiles = torch.randint(
        0, 256, (count, channels, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    expected = make_grid(tiles, nrow=5, padding=GAP, pad_value=BACKGROUND)
    assert torch.equal(tile_grid(tiles, 5), expected if channels == 3 else expected[:1])


def test_the_mistakes_png_is_torchvisions_without_importing_torchvision():
    """The evaluate stage's PNG encoder is torchvision.io.encode_png's, byte for byte, and a process that writes
    one imports neither torchvision nor torch._dynamo (which took evaluate from 1.8 s to 3.1 s)."""
    code = (
        "import sys, torch\n"
        "from mnist_pipeline.pictures import png_bytes\n"
        "image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))\n"
        "print(png_bytes(image).hex())\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torchvision', 'torch._dynamo'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PROJECT)
    written, imported = result.stdout.splitlines()
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert bytes.fromhex(written) == encode_png(image, compression_level=6).numpy().tobytes()
    assert imported == "[]"
