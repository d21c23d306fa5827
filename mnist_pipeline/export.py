"""TorchScript export with byte-identical output, checked against the eager model."""

import io
import warnings
from pathlib import Path

import torch

from mnist_pipeline.model import MLP
from mnist_pipeline.stage import PipelineError, atomic_output

PARITY_TOLERANCE = 1e-5

# torch >= 2.10 deprecates TorchScript in favour of torch.export, but TorchScript is still
# what libtorch loads from C++; the warning is silenced only around our own calls.
TORCHSCRIPT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"


def torchscript_bytes(model: MLP) -> bytes:
    """The scripted model as a .pt archive whose bytes depend only on the model.

    Saving to a buffer names the archive's inner folder "archive" whatever the file is called.
    The `.debug_pkl` records (source ranges for error messages) hold the absolute paths of
    the Python sources, so they are left out, and the serialization id, a hash of the
    records, is written anew. Constants are ordered by string hash: the export stage pins
    PYTHONHASHSEED for that.
    """
    saved = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", TORCHSCRIPT_DEPRECATED, FutureWarning)
        torch.jit.save(torch.jit.script(model), saved)
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


def export_torchscript(model: MLP, path: Path, images: torch.Tensor) -> float:
    """Write `path`, load it back and return the max abs difference from `model` on `images`.

    The file is removed again if the difference exceeds PARITY_TOLERANCE.
    """
    with atomic_output(path) as file:
        file.write(torchscript_bytes(model))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", TORCHSCRIPT_DEPRECATED, FutureWarning)
        loaded = torch.jit.load(path, map_location="cpu")
    with torch.no_grad():
        difference = (loaded(images) - model(images)).abs().max().item()
    if difference > PARITY_TOLERANCE:
        path.unlink()
        raise PipelineError(
            f"{path}: exported model differs from the trained one by {difference:.2e} (tolerance {PARITY_TOLERANCE:g})"
        )
    return difference
