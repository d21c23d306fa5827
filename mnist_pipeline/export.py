"""The deployable model: TorchScript (primary) and torch.export files, byte-identical from run to run,
each shipped only once it gives evaluate's logits bit for bit."""

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnist_pipeline.data import IMAGE_SIZE, NUM_CLASSES, scale_pixels
from mnist_pipeline.model import MNIST_MEAN, MNIST_STD, Checkpoint, hidden_sizes
from mnist_pipeline.shipped import ShippedMLP, logits_sha256, softmax
from mnist_pipeline.stage import PipelineError, atomic_output
from mnist_pipeline.torchscript import load_torchscript, torchscript_deprecation_silenced

INPUT_CONTRACT = (
    "float32 [N, 1, 28, 28] or [N, 28, 28] with pixels in [0, 1], or uint8 of the same shapes in 0..255; "
    "light digits on a dark background, as in MNIST"
)


class DigitClassifier(nn.Module):
    """What models/model.pt holds: checked MNIST-style images in, logits or probabilities out."""

    def __init__(self, model: ShippedMLP) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        return self.model(self.pixels(images))

    @torch.jit.export
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax of the logits, [N, 10] (the same bits everywhere too: shipped.softmax)."""
        return softmax(self.forward(images))

    @torch.jit.export
    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Any accepted input as float32 [N, 1, 28, 28] in [0, 1]; anything else is a ValueError."""
        shape = list(images.shape)
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or list(images.shape[1:]) != [1, 28, 28]:
            raise ValueError("expected images of shape [N, 28, 28] or [N, 1, 28, 28], got " + str(shape))
        if images.dtype == torch.uint8:
            return scale_pixels(images)
        if images.dtype != torch.float32:
            raise ValueError("expected float32 pixels in [0, 1] or uint8 pixels in 0..255, got another dtype")
        # Not "min < 0 or max > 1", which a NaN passes: its comparisons are all false.
        if images.numel() > 0 and not (bool(images.min() >= 0) and bool(images.max() <= 1)):
            raise ValueError("float32 pixels must be in [0, 1], and numbers (pass uint8 for 0..255 values)")
        return images


def torchscript_bytes(model: ShippedMLP) -> bytes:
    """The scripted DigitClassifier as a .pt archive whose bytes depend only on the model.

    Saving to a buffer names the archive's inner folder "archive" whatever the file is called.
    The `.debug_pkl` records (source ranges for error messages) hold the absolute paths of
    the Python sources, so they are left out, and the serialization id, a hash of the
    records, is written anew. Constants are ordered by string hash: the export stage pins
    PYTHONHASHSEED for that.
    """
    saved = io.BytesIO()
    with torchscript_deprecation_silenced():
        torch.jit.save(torch.jit.script(DigitClassifier(model).eval()), saved)
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


def exported_program_bytes(model: ShippedMLP) -> bytes:
    """The model through torch.export, batch dimension dynamic, as a .pt2 archive.

    Input float32 [N, 1, 28, 28] in [0, 1], output logits. The example input is fixed and
    the nodes' stack traces (absolute source paths) are dropped, so the bytes are stable.
    """
    example = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    saved = io.BytesIO()
    torch.export.save(program, saved)
    return saved.getvalue()


def rows_differing(logits: torch.Tensor, expected: torch.Tensor) -> int:
    """How many rows of `logits` differ from `expected` in any bit (all of them if the shapes differ)."""
    if logits.shape != expected.shape or logits.dtype != expected.dtype:
        return len(expected)
    return int((logits.view(torch.int32) != expected.view(torch.int32)).any(1).sum())


def write_verified(
    content: bytes, path: Path, load: Callable[[Path], Callable], images: torch.Tensor, expected: torch.Tensor
) -> None:
    """Write `path`, load it back, and keep it only if its logits on `images` are `expected`, bit for bit."""
    with atomic_output(path) as file:
        file.write(content)
    with torch.no_grad():
        logits = load(path)(images)
    differing = rows_differing(logits, expected)
    if differing:
        path.unlink()
        raise PipelineError(
            f"{path}: its logits differ from evaluate's on {differing} of {len(expected)} test images; nothing exported"
        )


def export_torchscript(model: ShippedMLP, path: Path, images: torch.Tensor, expected: torch.Tensor) -> None:
    """models/model.pt, kept if its logits on uint8 `images` [N, 28, 28] are `expected` (evaluate's), bit for bit."""
    write_verified(torchscript_bytes(model), path, load_torchscript, images, expected)


def export_program(model: ShippedMLP, path: Path, images: torch.Tensor, expected: torch.Tensor) -> None:
    """models/model.pt2, kept if its logits on uint8 `images` [N, 28, 28] are `expected`, bit for bit (it
    takes them as float32 [N, 1, 28, 28] in [0, 1])."""
    pixels = scale_pixels(images).unsqueeze(1)
    write_verified(exported_program_bytes(model), path, lambda p: torch.export.load(p).module(), pixels, expected)


def model_card(
    checkpoint: Checkpoint, metrics: dict[str, float], artifacts: dict[str, Path], test_logits: torch.Tensor
) -> dict[str, Any]:
    """Everything a user of the artifacts needs to know, with the artifacts' sha256 and that of the
    logits evaluate measured (model.pt's on the test set), which a user's machine can check."""
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
            "forward": "logits, float32 [N, 10]: an image's are the same bits alone or in any batch, anywhere",
            "probabilities": "softmax of the logits, float32 [N, 10] (TorchScript method): the same bits anywhere",
        },
        "arithmetic": (
            "in the files themselves: each layer's input rounded per image to 8 bits below its largest magnitude, "
            "the weights stored on their 8-bit grid, every sum exact in float32 (docs/model.md)"
        ),
        "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD, "applied": "inside the model"},
        "labels": [str(digit) for digit in range(NUM_CLASSES)],
        "architecture": {
            "type": "multilayer perceptron",
            "layers": [IMAGE_SIZE * IMAGE_SIZE, *hidden_sizes(checkpoint.model), NUM_CLASSES],
            "activation": "ReLU",
        },
        "training": {"dataset": "MNIST training set", **checkpoint.train_params},
        "metrics": {"dataset": "MNIST test set", **metrics},
        "test_logits": {
            "sha256": logits_sha256(test_logits),
            "of": (
                "forward on the MNIST test set as t10k-images-idx3-ubyte holds it (uint8 "
                f"[{len(test_logits)}, 28, 28], in file order): float32 [{len(test_logits)}, {NUM_CLASSES}], "
                "row-major, little-endian bytes"
            ),
            "check": "uv run mnist-predict --check",
        },
        "torch_version": torch.__version__,
    }
