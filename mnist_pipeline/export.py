"""The deployable model: TorchScript (primary) and torch.export files, byte-identical from run to run."""

import copy
import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnist_pipeline.data import IMAGE_SIZE, NUM_CLASSES, scale_pixels
from mnist_pipeline.model import MNIST_MEAN, MNIST_STD, Checkpoint, hidden_sizes
from mnist_pipeline.stage import PipelineError, atomic_output
from mnist_pipeline.torchscript import load_torchscript, torchscript_deprecation_silenced

PARITY_TOLERANCE = 1e-5

INPUT_CONTRACT = (
    "float32 [N, 1, 28, 28] or [N, 28, 28] with pixels in [0, 1], or uint8 of the same shapes in 0..255; "
    "light digits on a dark background, as in MNIST"
)


class DigitClassifier(nn.Module):
    """What models/model.pt holds: checked MNIST-style images in, logits or probabilities out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        return self.model(self.pixels(images))

    @torch.jit.export
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax of the logits, [N, 10]."""
        return torch.softmax(self.forward(images), dim=1)

    @torch.jit.export
    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Any accepted input as float32 [N, 1, 28, 28] in [0, 1]; anything else is a ValueError."""
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or list(images.shape[1:]) != [1, 28, 28]:
            raise ValueError("expected images of shape [N, 28, 28] or [N, 1, 28, 28], got " + str(list(images.shape)))
        if images.dtype == torch.uint8:
            return scale_pixels(images)
        if images.dtype != torch.float32:
            raise ValueError("expected float32 pixels in [0, 1] or uint8 pixels in 0..255, got another dtype")
        if images.numel() > 0 and (bool(images.min() < 0) or bool(images.max() > 1)):
            raise ValueError("float32 pixels must be in [0, 1] (pass uint8 for 0..255 values)")
        return images


def inference_copy(model: nn.Module) -> nn.Module:
    """The model without gradients, so that users' outputs carry no autograd graph."""
    return copy.deepcopy(model).requires_grad_(False).eval()


def torchscript_bytes(model: nn.Module) -> bytes:
    """The scripted DigitClassifier as a .pt archive whose bytes depend only on the model.

    Saving to a buffer names the archive's inner folder "archive" whatever the file is called.
    The `.debug_pkl` records (source ranges for error messages) hold the absolute paths of
    the Python sources, so they are left out, and the serialization id, a hash of the
    records, is written anew. Constants are ordered by string hash: the export stage pins
    PYTHONHASHSEED for that.
    """
    saved = io.BytesIO()
    with torchscript_deprecation_silenced():
        torch.jit.save(torch.jit.script(DigitClassifier(inference_copy(model))), saved)
    reader = torch._C.PyTorchFileReader(io.BytesIO(saved.getvalue()))
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    for name in reader.get_all_records():
        if name.endswith(".debug_pkl") or name == ".data/serialization_id":
            continue
        data = reader.get_record(name)
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    return out.getvalue()


def exported_program_bytes(model: nn.Module) -> bytes:
    """The model through torch.export, batch dimension dynamic, as a .pt2 archive.

    Input float32 [N, 1, 28, 28] in [0, 1], output logits. The example input is fixed and
    the nodes' stack traces (absolute source paths) are dropped, so the bytes are stable.
    """
    example = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    program = torch.export.export(
        inference_copy(model), (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}
    )
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    saved = io.BytesIO()
    torch.export.save(program, saved)
    return saved.getvalue()


def write_verified(
    content: bytes, path: Path, load: Callable[[Path], Callable], images: torch.Tensor, expected: torch.Tensor
) -> float:
    """Write `path`, load it back, and return the max abs difference of its logits on `images` from `expected`.

    The file is removed again unless the difference is within PARITY_TOLERANCE (NaN is not).
    """
    with atomic_output(path) as file:
        file.write(content)
    with torch.no_grad():
        difference = (load(path)(images) - expected).abs().max().item()
    if not difference <= PARITY_TOLERANCE:
        path.unlink()
        raise PipelineError(
            f"{path}: exported model differs from the trained one by {difference:.2e} (tolerance {PARITY_TOLERANCE:g})"
        )
    return difference


def export_torchscript(model: nn.Module, path: Path, images: torch.Tensor, expected: torch.Tensor) -> float:
    """models/model.pt, checked against the trained model's logits `expected` on `images`; the max abs difference."""
    return write_verified(torchscript_bytes(model), path, load_torchscript, images, expected)


def export_program(model: nn.Module, path: Path, images: torch.Tensor, expected: torch.Tensor) -> float:
    """models/model.pt2, checked against the trained model's logits `expected` on `images`; the max abs difference."""
    return write_verified(
        exported_program_bytes(model), path, lambda p: torch.export.load(p).module(), images, expected
    )


def model_card(checkpoint: Checkpoint, metrics: dict[str, float], artifacts: dict[str, Path]) -> dict[str, Any]:
    """Everything a user of the artifacts needs to know, with the artifacts' sha256."""
    return {
        "name": "mnist-mlp",
        "task": "handwritten digit classification (MNIST)",
        "artifacts": {
            name: {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            for name, path in artifacts.items()
        },
        "input": {
            "torchscript": INPUT_CONTRACT,
            "torch_export": "float32 [N, 1, 28, 28] with pixels in [0, 1]",
        },
        "output": {
            "forward": "logits, float32 [N, 10]",
            "probabilities": "softmax of the logits, float32 [N, 10] (TorchScript method)",
        },
        "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD, "applied": "inside the model"},
        "labels": [str(digit) for digit in range(NUM_CLASSES)],
        "architecture": {
            "type": "multilayer perceptron",
            "layers": [IMAGE_SIZE * IMAGE_SIZE, *hidden_sizes(checkpoint.model), NUM_CLASSES],
            "activation": "ReLU",
        },
        "training": {"dataset": "MNIST training set", **checkpoint.train_params},
        "metrics": {"dataset": "MNIST test set", **metrics},
        "torch_version": torch.__version__,
    }
