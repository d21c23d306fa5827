"""What every stage script needs: its paths from dvc.yaml, one-line errors, and outputs that
appear whole or not at all."""

import argparse
import csv
import inspect
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class PipelineError(Exception):
    """A mistake the user can fix (bad params, bad data, missing device); printed as one line."""


class FailureReported(Exception):
    """A failure whose line another process (a training rank) has printed already: exit code 1, nothing more."""


def is_rank() -> bool:
    """Whether this process is one of the workers that torchrun started (ours or the user's)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def run_stage(main: Callable[..., None]) -> None:
    """Run a stage's main() with the paths its command line names, one option per parameter, then exit.

    dvc.yaml is the one place that names each stage's files: a parameter `per_class` of main()
    is the required option `--per-class PATH`. A PipelineError becomes one line and exit code 1.
    SIGTERM (what `kill`, schedulers and container runtimes send) unwinds like Ctrl-C, so that
    the temporary files of half-written outputs are removed either way.

    In a rank of a distributed training (see distributed.py), an error line names the rank, and
    an interruption is silent: the process that launched the ranks reports it once.
    """
    rank = f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: " if is_rank() else None
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT was inherited ignored
        signal.signal(signal.SIGINT, _interrupt)  # the same KeyboardInterrupt, which interruptions_deferred can defer
    parser = argparse.ArgumentParser(description=sys.modules[main.__module__].__doc__)
    for name in inspect.signature(main).parameters:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True, metavar="PATH")
    paths = vars(parser.parse_args())
    status = 0
    try:
        main(**paths)
    except PipelineError as error:
        print(f"error: {rank or ''}{error}", file=sys.stderr)
        status = 1
    except FailureReported:
        status = 1
    except KeyboardInterrupt as interrupt:
        received = interrupt.args[0] if interrupt.args else signal.SIGINT
        if rank is None:
            print(f"interrupted ({received.name})", file=sys.stderr)
        status = 128 + received
    # Every output is written and closed by now. Skip the interpreter's teardown, which frees each
    # module and runs the CUDA libraries' destructors: 0.45 s with torch loaded, paid by every stage.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


_deferring = False
_pending: signal.Signals | None = None


def _interrupt(received: int, frame: object) -> None:
    global _pending
    if _deferring:
        _pending = _pending or signal.Signals(received)
    else:
        raise KeyboardInterrupt(signal.Signals(received))


@contextmanager
def interruptions_deferred() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise their KeyboardInterrupt only at interruption_point() or at its end.

    Raised between any two bytecodes, it can land inside the code of a library's threads and locks
    and break it: DVCLive's Live.end() then waits forever for a worker thread that never started
    or for a lock left held, and tqdm turns it into a RuntimeError that it catches, so training goes on.
    (Only in a stage: elsewhere Python's own SIGINT handler raises it at once, as before.) Within an
    outer block, an inner one's end raises nothing: the outer block's end does.
    """
    global _deferring
    outer = _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = outer
        if not outer:
            interruption_point()


def interruption_point() -> None:
    """Raise the KeyboardInterrupt of a SIGTERM or SIGINT that arrived while interruptions were deferred."""
    global _pending
    if _pending is not None:
        received, _pending = _pending, None
        raise KeyboardInterrupt(received)


def counted(number: int, noun: str) -> str:
    """'1 epoch', '9 epochs'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def remove_output(path: Path) -> None:
    """Remove an output file or folder, if it is there."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file beside `path`, renamed onto it only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as file:
            yield file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_table(columns: dict[str, Sequence[Any]], path: Path) -> None:
    """A CSV table (for DVC plots) from equally long columns, written atomically."""
    with atomic_output(path, "w") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(zip(*columns.values(), strict=True))


def write_json(data: dict[str, Any], path: Path) -> None:
    """Indented JSON with a final newline, written atomically."""
    with atomic_output(path, "w") as file:
        json.dump(data, file, indent=2)
        file.write("\n")
