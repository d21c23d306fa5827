"""Stage evaluate: test-set loss and accuracy -> metrics/eval.json, plus per-class and confusion plots."""

from pathlib import Path

import torch

from mnist_pipeline.data import load_mnist, scale_pixels, to_tensors
from mnist_pipeline.metrics import evaluate, per_class_accuracy
from mnist_pipeline.model import load_checkpoint
from mnist_pipeline.stage import run_stage, write_json, write_table

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data" / "mnist"
CHECKPOINT = ROOT / "models" / "checkpoint.pt"
METRICS = ROOT / "metrics" / "eval.json"
PER_CLASS = ROOT / "metrics" / "per_class.csv"
PREDICTIONS = ROOT / "metrics" / "predictions.csv"


def main() -> None:
    model = load_checkpoint(CHECKPOINT).model
    test_images, test_labels = load_mnist(DATA_DIR, "test")
    # On the CPU whatever the training device: the figures then match the exported model's.
    images, labels = to_tensors(test_images, test_labels, torch.device("cpu"))
    result = evaluate(model, scale_pixels(images), labels)
    print(f"test loss {result.loss:.4f}, accuracy {result.accuracy:.4f} ({len(test_labels)} images)")
    write_json({"loss": result.loss, "accuracy": result.accuracy}, METRICS)
    per_class = per_class_accuracy(test_labels, result.predictions)
    write_table({"digit": range(len(per_class)), "accuracy": per_class}, PER_CLASS)
    write_table({"actual": test_labels, "predicted": result.predictions}, PREDICTIONS)


if __name__ == "__main__":
    run_stage(main)
