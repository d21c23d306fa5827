"""Loading TorchScript files, without the deprecation noise for the artifact we choose to ship."""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# torch >= 2.10 deprecates TorchScript in favour of torch.export, but TorchScript is still
# what libtorch loads from C++; the warning is silenced only around our own calls.
TORCHSCRIPT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"


@contextmanager
def torchscript_deprecation_silenced() -> Iterator[None]:
    """Hide torch's TorchScript deprecation warning inside the block, and only there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", TORCHSCRIPT_DEPRECATED, FutureWarning)
        yield


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """torch.jit.load on the CPU, in eval mode."""
    with torchscript_deprecation_silenced():
        return torch.jit.load(path, map_location="cpu").eval()
