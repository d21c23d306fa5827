"""What every stage script needs: one-line errors and outputs that appear whole or not at all."""

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


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


def write_table(data: dict[str, Any] | list[dict[str, Any]], path: Path) -> None:
    """A CSV table (for DVC plots) from columns or rows, written atomically with pandas.

    pandas is imported here, once the work is done, because importing it takes about a
    second and 44 MB of memory that the stages do not need before.
    """
    import pandas as pd

    with atomic_output(path, "w") as file:
        pd.DataFrame(data).to_csv(file, index=False)


def write_json(data: dict[str, Any], path: Path) -> None:
    """Indented JSON with a final newline, written atomically."""
    with atomic_output(path, "w") as file:
        json.dump(data, file, indent=2)
        file.write("\n")
