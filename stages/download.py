"""Stage download: the four MNIST IDX files, each verified against the checksum table."""

import os
from pathlib import Path

from mnist_pipeline.download import DEADLINE_VARIABLE, download_deadline, download_mnist, mirror_list, read_checksums
from mnist_pipeline.stage import run_stage


def main(checksums: Path, out: Path) -> None:
    deadline = download_deadline(os.environ.get(DEADLINE_VARIABLE))
    # A relative MNIST_MIRROR is relative to the project root. DVC_ROOT names it, also in the
    # temporary copies where queued and --temp experiments run (DVC sets it to the main one).
    mirrors = mirror_list(os.environ.get("MNIST_MIRROR"), Path(os.environ.get("DVC_ROOT", ".")))
    download_mnist(out, read_checksums(checksums), mirrors, deadline)


if __name__ == "__main__":
    run_stage(main)
