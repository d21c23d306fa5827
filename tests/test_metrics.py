import math

import numpy as np
import pytest
import torch
from torch import nn

from mnist_pipeline.metrics import EVAL_BATCH_SIZE, evaluate, per_class_accuracy


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
