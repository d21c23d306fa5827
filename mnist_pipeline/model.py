"""The multilayer perceptron, and the checkpoint that holds everything needed to rebuild it."""

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from mnist_pipeline.data import IMAGE_SIZE, NUM_CLASSES
from mnist_pipeline.stage import PipelineError, atomic_output

# Mean and standard deviation of MNIST's training pixels, scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
CHECKPOINT_KEYS = {"hidden_sizes", "train_params", "state_dict"}


class MLP(nn.Module):
    """Pixels in [0, 1], shaped [N, 1, 28, 28] or [N, 784] -> 10 logits, via ReLU hidden layers.

    Normalization and flattening happen inside, so the exported module takes raw pixels.
    """

    mean: Final[float]
    std: Final[float]

    def __init__(self, hidden_sizes: list[int]) -> None:
        super().__init__()
        self.mean = MNIST_MEAN
        self.std = MNIST_STD
        layers: list[nn.Module] = []
        width = IMAGE_SIZE * IMAGE_SIZE
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, NUM_CLASSES))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x.flatten(1) - self.mean) / self.std)


@dataclass(frozen=True)
class Checkpoint:
    model: MLP
    train_params: dict[str, Any]  # the train.* params the weights came from, and the augment.* ones as "augment"


def hidden_sizes(model: MLP) -> list[int]:
    """The widths of the hidden layers, read off the model."""
    return [layer.out_features for layer in model.layers if isinstance(layer, nn.Linear)][:-1]


def save_checkpoint(model: MLP, train_params: dict[str, Any], path: Path) -> None:
    """Weights plus the architecture (so `load_checkpoint` needs nothing else) and the training params."""
    checkpoint = {"hidden_sizes": hidden_sizes(model), "train_params": train_params, "state_dict": model.state_dict()}
    with atomic_output(path) as file:
        torch.save(checkpoint, file)


def load_checkpoint(path: Path) -> Checkpoint:
    """The trained model, on the CPU and in eval mode, with what it was built from.

    Anything else (an empty, truncated or foreign file, weights that do not fit, NaN weights)
    is a PipelineError naming the file and the stage that rewrites it.
    """

    def invalid(reason: str) -> PipelineError:
        return PipelineError(f"{path}: {reason}; the train stage rewrites it: dvc repro train")

    if not path.is_file():
        raise invalid("file not found")
    if path.stat().st_size == 0:
        raise invalid("empty file")
    try:
        # torch.load's own messages for foreign files advise loading them with weights_only=False,
        # which runs whatever code the file holds: say only that the file is not a checkpoint.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file can fail in any of torch.load's layers
        raise invalid(f"damaged or not a checkpoint (torch.load raised {type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or not checkpoint.keys() >= CHECKPOINT_KEYS:
        raise invalid(f"not a checkpoint of the train stage (expected a dict of {', '.join(sorted(CHECKPOINT_KEYS))})")
    sizes, weights = checkpoint["hidden_sizes"], checkpoint["state_dict"]
    if not isinstance(sizes, list) or not all(isinstance(n, int) and n > 0 for n in sizes):
        raise invalid(f"hidden_sizes must be a list of positive integers, got {sizes!r}")
    with torch.device("meta"):  # the expected shapes, without allocating a model of any size
        expected = {name: tensor.shape for name, tensor in MLP(sizes).state_dict().items()}
    found = {name: tensor.shape for name, tensor in weights.items()} if isinstance(weights, dict) else None
    if found != expected:
        raise invalid(f"its weights do not fit the multilayer perceptron with hidden sizes {sizes}")
    if not all(torch.isfinite(tensor).all() for tensor in weights.values()):
        raise invalid("its weights hold NaN or infinite values")
    model = MLP(sizes)
    model.load_state_dict(weights)
    return Checkpoint(model.eval(), checkpoint["train_params"])
