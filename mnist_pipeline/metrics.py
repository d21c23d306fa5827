"""Test-set loss and accuracy, computed per sample."""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline.data import NUM_CLASSES

EVAL_BATCH_SIZE = 1000


@dataclass(frozen=True)
class Evaluation:
    loss: float  # mean cross-entropy per sample
    accuracy: float  # fraction of samples classified correctly, in [0, 1]
    predictions: np.ndarray  # predicted class of each sample


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    """Sum the per-sample losses and divide by the number of samples (not by the number of batches)."""
    loss_sum = torch.zeros((), dtype=torch.float64)
    predictions = []
    for first in range(0, len(images), EVAL_BATCH_SIZE):
        logits = model(images[first : first + EVAL_BATCH_SIZE])
        target = labels[first : first + EVAL_BATCH_SIZE]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        predictions.append(logits.argmax(1))
    predicted = torch.cat(predictions)
    n = len(labels)
    return Evaluation(
        loss=loss_sum.item() / n,
        accuracy=(predicted == labels).sum().item() / n,
        predictions=predicted.numpy(),
    )


def per_class_accuracy(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Accuracy on the samples of each class 0..9 (NaN for a class with no samples)."""
    totals = np.bincount(labels, minlength=NUM_CLASSES)
    hits = np.bincount(labels[labels == predictions], minlength=NUM_CLASSES)
    with np.errstate(invalid="ignore"):
        return hits / totals
