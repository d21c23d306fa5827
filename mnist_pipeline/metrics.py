"""Test-set loss and accuracy, computed per sample, and the per-digit error rates."""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline.data import NUM_CLASSES, scale_pixels

EVAL_BATCH_SIZE = 1000


@dataclass(frozen=True)
class Evaluation:
    loss: float  # mean cross-entropy per sample
    accuracy: float  # fraction of samples classified correctly, in [0, 1]
    predictions: np.ndarray  # predicted class of each sample
    losses: np.ndarray  # cross-entropy of each sample
    logits: torch.Tensor  # float32 [N, 10], on the CPU


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    """Sum the per-sample losses and divide by the number of samples (not by the number of batches).

    uint8 images are scaled batch by batch, so a whole training set never sits in memory as floats.
    """
    outputs = []
    for first in range(0, len(images), EVAL_BATCH_SIZE):
        batch = images[first : first + EVAL_BATCH_SIZE]
        outputs.append(model(scale_pixels(batch) if batch.dtype == torch.uint8 else batch).float())
    logits = torch.cat(outputs)
    loss, predicted = F.cross_entropy(logits, labels, reduction="none"), logits.argmax(1)
    n = len(labels)
    return Evaluation(
        # Summed exactly and rounded once: a float sum's bits would depend on how the threads split it.
        loss=math.fsum(loss.tolist()) / n,
        accuracy=(predicted == labels).sum().item() / n,
        predictions=predicted.cpu().numpy(),
        losses=loss.cpu().numpy(),
        logits=logits.cpu(),
    )


def per_class_accuracy(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Accuracy on the samples of each class 0..9 (NaN for a class with no samples)."""
    totals = np.bincount(labels, minlength=NUM_CLASSES)
    hits = np.bincount(labels[labels == predictions], minlength=NUM_CLASSES)
    with np.errstate(invalid="ignore"):
        return hits / totals
