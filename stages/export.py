"""Stage export: the TorchScript model (primary), its torch.export twin, and the model card."""

import os
import sys

# TorchScript writes module constants in set order, which follows Python's string hashing:
# pin the hash seed (by restarting once) so that the saved file is the same on every run.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "PYTHONHASHSEED": "0"})

import json
from pathlib import Path

import torch

from mnist_pipeline.cores import reserved_cores
from mnist_pipeline.data import IMAGE_SIZE, load_mnist, scale_pixels, to_tensors
from mnist_pipeline.exact import use_exact_products
from mnist_pipeline.export import export_program, export_torchscript, model_card
from mnist_pipeline.model import load_checkpoint
from mnist_pipeline.stage import PipelineError, run_stage, write_json


def main(data: Path, checkpoint: Path, metrics: Path, torchscript: Path, program: Path, card: Path) -> None:
    # The trained model and the exported ones compute with the same exact products, as in evaluate.
    use_exact_products()
    trained = load_checkpoint(checkpoint)
    images, _ = to_tensors(*load_mnist(data, "test"), torch.device("cpu"))
    images = scale_pixels(images).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    with reserved_cores(torch.get_num_threads()):
        with torch.no_grad():
            expected = trained.model(images)
        if not expected.isfinite().all():
            raise PipelineError(f"{checkpoint}: the model's outputs on the test images overflow; nothing exported")
        for path, export in ((torchscript, export_torchscript), (program, export_program)):
            difference = export(trained.model, path, images, expected)
            checked = f"{len(images)} test images (max abs diff {difference:.1e})"
            print(f"{path.name}: matches the trained model on {checked}")
    try:
        test_metrics = json.loads(metrics.read_text())
    except (OSError, ValueError) as error:
        raise PipelineError(f"{metrics}: cannot read the test metrics (run dvc repro evaluate): {error}") from None
    write_json(model_card(trained, test_metrics, {"torchscript": torchscript, "torch_export": program}), card)


if __name__ == "__main__":
    run_stage(main)
