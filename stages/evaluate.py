"""Stage evaluate: the test-set loss and accuracy of the model as it ships, its logits (which the
export stage's files must give, bit for bit), the tables behind the per-digit and confusion plots,
and a picture of the digits the model gets most wrong."""

import math
from pathlib import Path

import torch

from mnist_pipeline.cores import reserved_cores
from mnist_pipeline.data import load_mnist, to_tensors
from mnist_pipeline.metrics import evaluate, per_class_accuracy
from mnist_pipeline.model import load_checkpoint
from mnist_pipeline.pictures import mistakes_grid, write_png
from mnist_pipeline.shipped import ShippedMLP, logits_bytes
from mnist_pipeline.stage import PipelineError, atomic_output, run_stage, write_json, write_table


def main(
    data: Path, checkpoint: Path, metrics: Path, logits: Path, per_digit: Path, confusions: Path, mistakes: Path
) -> None:
    # The model as the export stage ships it, on the CPU whatever the training device: its figures
    # are what a user of models/model.pt gets, on any machine and in any batch (shipped.py).
    model = ShippedMLP(load_checkpoint(checkpoint).model)
    test_images, test_labels = load_mnist(data, "test")
    images, labels = to_tensors(test_images, test_labels, torch.device("cpu"))
    with reserved_cores(torch.get_num_threads()):
        result = evaluate(model, images, labels)
    if not math.isfinite(result.loss):
        raise PipelineError(f"{checkpoint}: the model's test loss is {result.loss} (its outputs overflow); retrain it")
    print(f"test loss {result.loss:.4f}, accuracy {result.accuracy:.4f} ({len(test_labels)} images)")
    write_json({"loss": result.loss, "accuracy": result.accuracy}, metrics)
    with atomic_output(logits) as file:
        file.write(logits_bytes(result.logits))
    # Error rates in percent: on a 0-100% accuracy axis, digits that differ by 0.2% look alike.
    errors = 100 * (1 - per_class_accuracy(test_labels, result.predictions))
    write_table({"digit": range(len(errors)), "error_percent": [round(e, 2) for e in errors.tolist()]}, per_digit)
    # Only the misclassified samples: with the diagonal's thousands left out, the errors stand out.
    wrong = test_labels != result.predictions
    write_table({"actual": test_labels[wrong].tolist(), "predicted": result.predictions[wrong].tolist()}, confusions)
    write_png(mistakes_grid(test_images, test_labels, result.predictions, result.losses), mistakes)


if __name__ == "__main__":
    run_stage(main)
