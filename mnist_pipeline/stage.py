"""What every stage script needs: one-line errors and outputs that appear whole or not at all."""

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


class PipelineError(Exception):
    """A mistake the user can fix (bad params, bad data, missing device); printed as one line."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(), turning a PipelineError into a one-line message and exit code 1."""
    try:
        main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


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
