"""Fetching MNIST from a list of mirrors, verified by the md5 of each decompressed file."""

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from mnist_pipeline.stage import PipelineError, atomic_output

# torchvision.datasets.MNIST.mirrors, in torchvision's order.
OFFICIAL_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
CHUNK_SIZE = 1 << 20
TIMEOUT_SECONDS = 30


def read_checksums(path: Path) -> dict[str, str]:
    """Parse an `md5sum`-style table: one `<md5>  <file name>` per line."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise PipelineError(f"{path}: cannot read ({error.strerror})") from None
    checksums = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or len(fields[0]) != 32:
            raise PipelineError(f"{path}:{number}: expected '<md5> <file name>', got {line!r}")
        checksums[fields[1]] = fields[0].lower()
    return checksums


def mirror_list(mnist_mirror: str | None, root: Path) -> list[str]:
    """MNIST_MIRROR first when set (a directory, relative to `root`, or a URL prefix), then the official mirrors."""
    mirrors = list(OFFICIAL_MIRRORS)
    if mnist_mirror:
        if "://" in mnist_mirror:
            mirrors.insert(0, mnist_mirror.rstrip("/") + "/")
        else:
            mirrors.insert(0, (root / mnist_mirror).resolve().as_uri() + "/")
    return mirrors


def download_mnist(data_dir: Path, checksums: dict[str, str], mirrors: list[str]) -> None:
    """Fetch each `<name>.gz`, trying the mirrors in order, and store it decompressed as `data_dir/<name>`.

    The files gather in a temporary folder beside `data_dir`, which takes its place only once
    every file is verified: a failure leaves no partial dataset behind.
    """
    partial = data_dir.with_name(f".{data_dir.name}.{os.getpid()}.tmp")
    try:
        for name, md5 in checksums.items():
            failures = []
            for mirror in mirrors:
                try:
                    fetch_verified(mirror + name + ".gz", partial / name, md5)
                    break
                except (OSError, zlib.error, ValueError) as error:
                    failures.append(f"{mirror}: {describe(error)}")
            else:
                raise PipelineError(f"could not get {name}.gz from any mirror: " + "; ".join(failures))
        if data_dir.exists():
            shutil.rmtree(data_dir)
        os.replace(partial, data_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def fetch_verified(url: str, target: Path, md5: str) -> None:
    """Stream a gzip file from `url`, decompressing into `target`; nothing is left behind unless it verifies."""
    digest = hashlib.md5()
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
    with (
        urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response,
        atomic_output(target) as out,
        tqdm(
            desc=target.name,
            total=int(response.headers.get("Content-Length") or 0) or None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            leave=False,
        ) as progress,
    ):
        while chunk := response.read(CHUNK_SIZE):
            data = decompressor.decompress(chunk)
            digest.update(data)
            out.write(data)
            progress.update(len(chunk))
        if not decompressor.eof:
            raise ValueError("truncated gzip stream")
        if digest.hexdigest() != md5:
            raise ValueError(f"md5 of decompressed content is {digest.hexdigest()}, expected {md5}")
    print(f"{target.name}: verified, from {url}")


def describe(error: Exception) -> str:
    """A short reason for a failed fetch, without the traceback."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    if isinstance(error, zlib.error):
        return f"not a valid gzip file ({error})"
    return str(error)
