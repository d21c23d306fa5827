"""The multilayer perceptron, and the checkpoint that holds everything needed to rebuild it."""

import pickle
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
    train_params: dict[str, Any]  # the train.* params the weights came from


def hidden_sizes(model: MLP) -> list[int]:
    """The widths of the hidden layers, read off the model."""
    return [layer.out_features for layer in model.layers if isinstance(layer, nn.Linear)][:-1]


def save_checkpoint(model: MLP, train_params: dict[str, Any], path: Path) -> None:
    """Weights plus the architecture (so `load_checkpoint` needs nothing else) and the training params."""
    checkpoint = {"hidden_sizes": hidden_sizes(model), "train_params": train_params, "state_dict": model.state_dict()}
    with atomic_output(path) as file:
        torch.save(checkpoint, file)


def load_checkpoint(path: Path) -> Checkpoint:
    """The trained model, on the CPU and in eval mode, with what it was built from."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = MLP(checkpoint["hidden_sizes"])
        model.load_state_dict(checkpoint["state_dict"])
        return Checkpoint(model.eval(), checkpoint["train_params"])
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (run the train stage: dvc repro train)") from None
    except (RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        reason = str(error).splitlines()[0]
        raise PipelineError(f"{path}: not a checkpoint written by the train stage ({reason})") from None
