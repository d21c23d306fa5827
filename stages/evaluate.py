"""Stage evaluate: test-set loss and accuracy, the tables behind the per-digit and confusion
plots, and a picture of the digits the model gets most wrong."""

import math
from pathlib import Path

import torch

from mnist_pipeline.cores import reserved_cores
from mnist_pipeline.data import load_mnist, to_tensors
from mnist_pipeline.exact import use_exact_products
from mnist_pipeline.metrics import evaluate, per_class_accuracy
from mnist_pipeline.model import load_checkpoint
from mnist_pipeline.pictures import mistakes_grid, write_png
from mnist_pipeline.stage import PipelineError, run_stage, write_json, write_table


def main(data: Path, checkpoint: Path, metrics: Path, per_digit: Path, confusions: Path, mistakes: Path) -> None:
    # On the CPU whatever the training device, with exact products whatever train.arithmetic: the
    # figures are then a function of the checkpoint alone, the same on every machine.
    use_exact_products()
    model = load_checkpoint(checkpoint).model
    test_images, test_labels = load_mnist(data, "test")
    images, labels = to_tensors(test_images, test_labels, torch.device("cpu"))
    with reserved_cores(torch.get_num_threads()):
        result = evaluate(model, images, labels)
    if not math.isfinite(result.loss):
        raise PipelineError(f"{checkpoint}: the model's test loss is {result.loss} (its outputs overflow); retrain it")
    print(f"test loss {result.loss:.4f}, accuracy {result.accuracy:.4f} ({len(test_labels)} images)")
    write_json({"loss": result.loss, "accuracy": result.accuracy}, metrics)
    # Error rates in percent: on a 0-100% accuracy axis, digits that differ by 0.2% look alike.
    errors = 100 * (1 - per_class_accuracy(test_labels, result.predictions))
    write_table({"digit": range(len(errors)), "error_percent": [round(e, 2) for e in errors.tolist()]}, per_digit)
    # Only the misclassified samples: with the diagonal's thousands left out, the errors stand out.
    wrong = test_labels != result.predictions
    write_table({"actual": test_labels[wrong].tolist(), "predicted": result.predictions[wrong].tolist()}, confusions)
    write_png(mistakes_grid(test_images, test_labels, result.predictions, result.losses), mistakes)


if __name__ == "__main__":
    run_stage(main)
