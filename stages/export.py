"""Stage export: models/model.pt (TorchScript), models/model.pt2 (torch.export), models/model.json (card)."""

import os
import sys

# TorchScript writes module constants in set order, which follows Python's string hashing:
# pin the hash seed (by restarting once) so that the saved file is the same on every run.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "PYTHONHASHSEED": "0"})

import json
from pathlib import Path

import torch

from mnist_pipeline.data import IMAGE_SIZE, load_mnist, scale_pixels, to_tensors
from mnist_pipeline.export import export_program, export_torchscript, model_card
from mnist_pipeline.model import load_checkpoint
from mnist_pipeline.stage import PipelineError, run_stage, write_json

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data" / "mnist"
CHECKPOINT = ROOT / "models" / "checkpoint.pt"
METRICS = ROOT / "metrics" / "eval.json"
TORCHSCRIPT = ROOT / "models" / "model.pt"
PROGRAM = ROOT / "models" / "model.pt2"
CARD = ROOT / "models" / "model.json"


def main() -> None:
    checkpoint = load_checkpoint(CHECKPOINT)
    images, _ = to_tensors(*load_mnist(DATA_DIR, "test"), torch.device("cpu"))
    images = scale_pixels(images).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    for path, export in ((TORCHSCRIPT, export_torchscript), (PROGRAM, export_program)):
        difference = export(checkpoint.model, path, images)
        print(f"{path.name}: matches the trained model on {len(images)} test images (max abs diff {difference:.1e})")
    try:
        metrics = json.loads(METRICS.read_text())
    except (OSError, ValueError) as error:
        raise PipelineError(f"{METRICS}: cannot read the test metrics (run dvc repro evaluate): {error}") from None
    card = model_card(checkpoint, metrics, {"torchscript": TORCHSCRIPT, "torch_export": PROGRAM})
    write_json(card, CARD)


if __name__ == "__main__":
    run_stage(main)
