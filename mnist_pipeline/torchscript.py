"""Loading TorchScript files, without the deprecation noise for the artifact we choose to ship."""

import warnings
from pathlib import Path

import torch

# torch >= 2.10 deprecates TorchScript in favour of torch.export, but TorchScript is still
# what libtorch loads from C++; the warning is silenced only around our own calls.
TORCHSCRIPT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """torch.jit.load on the CPU, in eval mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", TORCHSCRIPT_DEPRECATED, FutureWarning)
        return torch.jit.load(path, map_location="cpu").eval()
