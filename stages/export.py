"""Stage export: the trained model as TorchScript -> models/model.pt, checked on the test set."""

import os
import sys

# TorchScript writes module constants in set order, which follows Python's string hashing:
# pin the hash seed (by restarting once) so that the saved file is the same on every run.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "PYTHONHASHSEED": "0"})

from pathlib import Path

import torch

from mnist_pipeline.data import load_mnist, to_tensors
from mnist_pipeline.export import export_torchscript
from mnist_pipeline.model import load_checkpoint
from mnist_pipeline.stage import run_stage

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data" / "mnist"
CHECKPOINT = ROOT / "models" / "checkpoint.pt"
EXPORTED = ROOT / "models" / "model.pt"


def main() -> None:
    model = load_checkpoint(CHECKPOINT)
    images, _ = to_tensors(*load_mnist(DATA_DIR, "test"), torch.device("cpu"))
    difference = export_torchscript(model, EXPORTED, images.view(-1, 1, 28, 28))
    print(f"{EXPORTED.name}: matches the trained model on {len(images)} test images (max abs diff {difference:.1e})")


if __name__ == "__main__":
    run_stage(main)
