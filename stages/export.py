"""Stage export: the TorchScript model (primary), its torch.export twin, and the model card. Each file
is kept only if it gives the logits evaluate measured, bit for bit."""

import os
import sys

# TorchScript writes module constants in set order, which follows Python's string hashing:
# pin the hash seed (by restarting once) so that the saved file is the same on every run.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "PYTHONHASHSEED": "0"})

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mnist_pipeline.cores import reserved_cores
from mnist_pipeline.data import load_mnist
from mnist_pipeline.export import export_program, export_torchscript, model_card
from mnist_pipeline.model import load_checkpoint
from mnist_pipeline.shipped import ShippedMLP, logits_from_bytes
from mnist_pipeline.stage import PipelineError, run_stage, write_json


def main(
    data: Path, checkpoint: Path, metrics: Path, logits: Path, torchscript: Path, program: Path, card: Path
) -> None:
    trained = load_checkpoint(checkpoint)
    model = ShippedMLP(trained.model)
    images = torch.from_numpy(load_mnist(data, "test")[0])  # uint8 [N, 28, 28], as the IDX file holds them
    test_metrics = read_result(metrics, json.loads)
    expected = read_result(logits, lambda content: logits_from_bytes(content, len(images)))
    with reserved_cores(torch.get_num_threads()):
        for path, export in ((torchscript, export_torchscript), (program, export_program)):
            export(model, path, images, expected)
            print(f"{path.name}: gives evaluate's logits on the {len(images)} test images, bit for bit")
    write_json(model_card(trained, test_metrics, {"torchscript": torchscript, "torch_export": program}, expected), card)


def read_result(path: Path, parse: Callable[[bytes], Any]) -> Any:
    """An output of the evaluate stage, parsed; a PipelineError naming it if it cannot be read or parsed."""
    try:
        return parse(path.read_bytes())
    except OSError as error:
        raise PipelineError(f"{path}: cannot read it ({error.strerror}); run dvc repro evaluate") from None
    except ValueError as error:
        raise PipelineError(f"{path}: not what the evaluate stage writes ({error}); run dvc repro evaluate") from None


if __name__ == "__main__":
    run_stage(main)
