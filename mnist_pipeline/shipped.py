"""The model as it ships: models/model.pt and model.pt2 carry their arithmetic in their own graph.

An image's logits are then a function of that image and the weights alone: the same bits alone or
in a batch of any size and at any position, on every x86-64 CPU at any thread count, in Python or
in libtorch, with no setting in the environment. The evaluate stage measures this model, and the
export stage ships files only if they give evaluate's logits bit for bit.

How: the portable arithmetic of exact.py, with a grid for each image. Each layer's input is rounded
to a grid of 2**GRID_BITS steps below the largest magnitude of its own row, and the weights are
stored already on theirs (the grid training rounds them to). Every product of the layer is then an
integer times a power of two, and every sum of up to EXACT_TERMS of them is exact in float32:
whatever kernel the BLAS library picks for the batch, the CPU or the thread count, it returns the
exact sums. The chunks of a longer sum, and the bias, are added in a fixed order. Every other
operation in the graph is exact (frexp, max, slicing) or one IEEE operation per element, which
rounds alike in every kernel. The softmax of `probabilities` takes its exponentials from
elementary.py, in float64.

Training rounds a whole batch to one grid instead (exact.py), which keeps the weights' gradients,
sums over the batch, exact. For an image alone the two are the same arithmetic (a test checks);
in a batch, an image whose largest activation is below the batch's gets a finer grid here.
"""

import hashlib
from typing import Final

import numpy as np
import torch
from torch import nn

from mnist_pipeline.data import NUM_CLASSES
from mnist_pipeline.elementary import exp
from mnist_pipeline.exact import (
    GRID_BITS,
    ROUNDING_SHIFT,
    SMALLEST_EXPONENT,
    chunk_plan,
    exact_products_paused,
    on_grid,
)
from mnist_pipeline.metrics import Evaluation, evaluate
from mnist_pipeline.model import MLP


class GridLinear(nn.Module):
    """nn.Linear with each row of its input rounded to its own grid, the weight stored on its grid, and
    the sum of each output exact in chunks of up to EXACT_TERMS terms, added in order."""

    smallest: Final[float]
    shift_per_power: Final[float]

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        # TorchScript reads no module-level numbers: the grid's constants travel as the module's own.
        self.smallest = 2.0**SMALLEST_EXPONENT
        self.shift_per_power = ROUNDING_SHIFT * 2.0**-GRID_BITS
        weight, _ = on_grid(layer.weight.detach().float())
        self.register_buffer("weight", weight.T.contiguous())  # [in, out]: the product is x @ weight
        # + 0.0 turns a -0.0 into 0.0, so that an output that sums to zero is +0.0 whatever the kernel.
        self.register_buffer("bias", layer.bias.detach().float() + 0.0)
        size, _ = chunk_plan(layer.in_features)
        self.bounds: list[int] = [*range(0, layer.in_features, size), layer.in_features]

    def rounded(self, x: torch.Tensor) -> torch.Tensor:
        """Each row of `x` [N, K] rounded as exact.on_grid rounds a whole tensor: to multiples of a power of
        two (the unit), 2**GRID_BITS units at most, the unit set by the row's largest magnitude."""
        largest = x.abs().amax(1, keepdim=True).clamp(min=self.smallest)
        mantissa, _ = torch.frexp(largest)  # largest = mantissa * 2**e, so largest / mantissa is 2**e exactly
        # ROUNDING_SHIFT units of 2**(e - GRID_BITS): adding and subtracting it rounds to the unit (exact.py).
        # A row holding an infinity or a NaN becomes all NaN.
        shift = largest / mantissa * self.shift_per_power
        return x + shift - shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.rounded(x)
        y = x[:, self.bounds[0] : self.bounds[1]] @ self.weight[self.bounds[0] : self.bounds[1]]
        for i in range(1, len(self.bounds) - 1):
            y = y + x[:, self.bounds[i] : self.bounds[i + 1]] @ self.weight[self.bounds[i] : self.bounds[i + 1]]
        return y + self.bias


class ShippedMLP(nn.Module):
    """The trained MLP in the arithmetic that ships: pixels in [0, 1], [N, 1, 28, 28] or [N, 784] -> logits."""

    mean: Final[float]
    std: Final[float]

    def __init__(self, model: MLP) -> None:
        super().__init__()
        self.mean = model.mean
        self.std = model.std
        self.layers = nn.Sequential(
            *(GridLinear(layer) if isinstance(layer, nn.Linear) else layer for layer in model.layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x.flatten(1) - self.mean) / self.std)


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 as float32, the same bits everywhere: float64 exponentials, summed in column order."""
    shifted = logits.double() - logits.double().amax(1, keepdim=True)
    exponentials = exp(shifted)
    total = exponentials[:, 0]
    for column in range(1, exponentials.shape[1]):
        total = total + exponentials[:, column]
    return (exponentials / total.unsqueeze(1)).float()


def evaluate_shipped(model: MLP, images: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    """evaluate() of `model` as it ships, in any process: one that trains with exact products on too."""
    with exact_products_paused():
        return evaluate(ShippedMLP(model).to(images.device), images, labels)


def logits_bytes(logits: torch.Tensor) -> bytes:
    """float32 logits [N, 10] as the model card hashes them: row-major, little-endian."""
    return logits.detach().cpu().contiguous().numpy().astype("<f4", copy=False).tobytes()


def logits_sha256(logits: torch.Tensor) -> str:
    """The sha256 of logits_bytes(logits), in hex."""
    return hashlib.sha256(logits_bytes(logits)).hexdigest()


def logits_from_bytes(content: bytes, rows: int) -> torch.Tensor:
    """logits_bytes' output back as float32 [rows, 10]; ValueError if its size is not that."""
    size = rows * NUM_CLASSES * 4
    if len(content) != size:
        raise ValueError(f"expected {rows} x {NUM_CLASSES} float32 logits ({size} bytes), found {len(content)} bytes")
    return torch.from_numpy(np.frombuffer(content, "<f4").astype(np.float32)).view(rows, NUM_CLASSES)
