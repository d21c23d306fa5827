"""Resuming an interrupted training: the state of its last completed epoch, kept where a rerun finds it.

DVC removes a stage's outputs before it runs the stage, so the state lives outside them, in the
project's .dvc/tmp/train-state/: DVC_ROOT's, so that a --temp or queued run, which DVC runs in a
copy under .dvc/tmp/exps/, finds the same folder. Each training has a file of its own, named by a
hash of everything that decides its bytes: the params, the data, the project's code and torch's
version. A run of other params, data or code finds no state of its own and starts afresh; a
training that ends removes its file.
"""

import dataclasses
import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch

from mnist_pipeline.stage import atomic_output
from mnist_pipeline.training import Progress

STATE_FOLDER = Path(".dvc") / "tmp" / "train-state"


def project_sources() -> list[Path]:
    """The source files of the project's modules that this process has imported: the stage's code."""
    modules = [module for name, module in sys.modules.items() if name.split(".")[0] in ("mnist_pipeline", "stages")]
    return [Path(module.__file__) for module in modules if getattr(module, "__file__", None)]


def state_path(settings: str, data: list[np.ndarray], code: list[Path]) -> Path | None:
    """Where the training of `settings` (its params, as text) on `data` by the source files `code` keeps
    its state; None outside a DVC project."""
    root = Path(os.environ.get("DVC_ROOT", "."))
    if not (root / ".dvc").is_dir():
        return None
    digest = hashlib.sha256(f"{settings}\ntorch {torch.__version__}\n".encode())
    for array in data:
        digest.update(np.ascontiguousarray(array).data)
    for source in sorted(code):
        digest.update(f"{source.parent.name}/{source.name}".encode() + b"\0" + source.read_bytes())
    return root / STATE_FOLDER / f"{digest.hexdigest()[:32]}.pt"


def save_state(path: Path, progress: Progress, live: Path) -> None:
    """`progress` and the DVCLive files in `live` so far, written atomically to `path`."""
    files = {p.relative_to(live).as_posix(): p.read_bytes() for p in sorted(live.rglob("*")) if p.is_file()}
    logs = {name: torch.frombuffer(bytearray(content), dtype=torch.uint8) for name, content in files.items()}
    with atomic_output(path) as file:
        torch.save({"progress": dataclasses.asdict(progress), "live": logs}, file)


def load_state(path: Path, live: Path) -> Progress | None:
    """The progress saved at `path`, with its DVCLive files written back into `live`; None if there is none
    (or it cannot be read, which is said)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        progress = Progress(**saved["progress"])
    except Exception as error:  # a file cut short by a crash of the machine, or of another version's making
        print(f"starting afresh: the saved state {path} cannot be read ({type(error).__name__})")
        return None
    for name, content in saved["live"].items():
        (live / name).parent.mkdir(parents=True, exist_ok=True)
        (live / name).write_bytes(content.numpy().tobytes())
    return progress


def discard_state(path: Path) -> None:
    """Remove the state at `path`, and the temporary file that a run killed while writing it leaves beside it
    (see atomic_output)."""
    for file in [path, *path.parent.glob(f".{path.name}.*.tmp")]:
        file.unlink(missing_ok=True)
