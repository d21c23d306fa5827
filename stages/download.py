"""Stage download: the four MNIST IDX files into data/mnist/, verified against data/mnist.md5."""

import os
from pathlib import Path

from mnist_pipeline.download import download_mnist, mirror_list, read_checksums
from mnist_pipeline.stage import run_stage

ROOT = Path(__file__).resolve().parent.parent
CHECKSUMS = ROOT / "data" / "mnist.md5"
DATA_DIR = ROOT / "data" / "mnist"


def main() -> None:
    mirrors = mirror_list(os.environ.get("MNIST_MIRROR"), ROOT)
    download_mnist(DATA_DIR, read_checksums(CHECKSUMS), mirrors)


if __name__ == "__main__":
    run_stage(main)
