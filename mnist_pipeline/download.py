"""Fetching MNIST from a list of mirrors, verified by the md5 of each decompressed file."""

import hashlib
import http.client
import math
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from mnist_pipeline.stage import PipelineError, atomic_output

# torchvision.datasets.MNIST.mirrors, in torchvision's order.
OFFICIAL_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# The published sizes of the decompressed files. A download stops as soon as its output outgrows
# the size: a corrupt or hostile .gz (a "gzip bomb") cannot fill the disk before the md5 check.
PUBLISHED_SIZES = {
    "train-images-idx3-ubyte": 47_040_016,
    "train-labels-idx1-ubyte": 60_008,
    "t10k-images-idx3-ubyte": 7_840_016,
    "t10k-labels-idx1-ubyte": 10_008,
}
DEADLINE_VARIABLE = "MNIST_DOWNLOAD_DEADLINE"
DEFAULT_DEADLINE_SECONDS = 300.0
MAX_DEADLINE_SECONDS = 86_400.0  # a day: beyond it a download is stuck, not slow
CHUNK_SIZE = 1 << 20
# The longest wait for any one read (connecting, headers, each piece of the body): a silent
# server fails its mirror after this long even when the file's deadline is further away.
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


def download_deadline(value: str | None) -> float:
    """The seconds each whole file may take: MNIST_DOWNLOAD_DEADLINE's `value` when set, else 300."""
    if not value:  # unset or empty, as for MNIST_MIRROR
        return DEFAULT_DEADLINE_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_DEADLINE_SECONDS:
        raise PipelineError(
            f"{DEADLINE_VARIABLE} must be a number of seconds for each file above 0 and up to "
            f"{MAX_DEADLINE_SECONDS:g} (default {DEFAULT_DEADLINE_SECONDS:g}), got {value!r}"
        )
    return seconds


def size_limit(name: str) -> int:
    """The most bytes that file `name` may decompress to."""
    # A name outside the table (a checksum file for another dataset in MNIST's format) gets the
    # largest published size: still a bound on what a bad .gz can write, and room for MNIST's.
    return PUBLISHED_SIZES.get(name, max(PUBLISHED_SIZES.values()))


def download_mnist(
    data_dir: Path, checksums: dict[str, str], mirrors: list[str], deadline: float = DEFAULT_DEADLINE_SECONDS
) -> None:
    """Fetch each `<name>.gz`, trying the mirrors in order, and store it decompressed as `data_dir/<name>`.

    A mirror fails a file that takes longer than `deadline` seconds, or grows past `size_limit`.
    The files gather in a temporary folder beside `data_dir`, which takes its place only once
    every file is verified: a failure leaves no partial dataset behind.
    """
    partial = data_dir.with_name(f".{data_dir.name}.{os.getpid()}.tmp")
    # A folder of this name can only be left by a killed process that had our pid (containers
    # reuse them): its files must not end up in the dataset.
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for name, md5 in checksums.items():
            failures = []
            for mirror in mirrors:
                try:
                    fetch_verified(mirror + name + ".gz", partial / name, md5, deadline)
                    break
                except (OSError, http.client.HTTPException, zlib.error, ValueError) as error:
                    failures.append(f"{mirror}: {describe(error)}")
                    if mirror != mirrors[-1]:
                        print(f"{name}.gz: {failures[-1]}; trying the next mirror")
            else:
                raise PipelineError(f"could not get {name}.gz from any mirror: " + "; ".join(failures))
        if data_dir.exists():
            shutil.rmtree(data_dir)
        os.replace(partial, data_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def fetch_verified(url: str, target: Path, md5: str, deadline: float = DEFAULT_DEADLINE_SECONDS) -> None:
    """Stream a gzip file from `url`, decompressing into `target`; nothing is left behind unless it verifies.

    The whole file must arrive within `deadline` seconds and decompress to at most `size_limit` bytes.
    """
    digest = hashlib.md5()
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
    limit = size_limit(target.name)
    size = 0
    expires = time.monotonic() + deadline
    try:
        with (
            deadline_at(expires),
            urllib.request.urlopen(url, timeout=min(TIMEOUT_SECONDS, deadline)) as response,
            atomic_output(target) as out,
            tqdm(
                desc=target.name,
                total=int(response.headers.get("Content-Length") or 0) or None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                leave=False,
                # None: no bar when stderr is not a terminal. In a log (CI, `dvc queue logs`) its
                # redraws are noise, and an error or interruption would not be one line.
                disable=None,
            ) as progress,
        ):
            # read1 returns what has arrived instead of waiting for a full chunk: the progress bar
            # moves for a slow mirror too.
            while chunk := response.read1(CHUNK_SIZE):
                progress.update(len(chunk))
                while True:
                    # At most CHUNK_SIZE bytes at a time: a gzip bomb never sits whole in memory.
                    data = decompressor.decompress(chunk, CHUNK_SIZE)
                    size += len(data)
                    if size > limit:
                        raise ValueError(f"decompresses to more than the expected {limit} bytes")
                    digest.update(data)
                    out.write(data)
                    chunk = decompressor.unconsumed_tail
                    # A full piece may leave output inside zlib even once all the input is consumed.
                    if not chunk and len(data) < CHUNK_SIZE:
                        break
            if not decompressor.eof:
                raise ValueError("truncated gzip stream")
            if digest.hexdigest() != md5:
                raise ValueError(f"md5 of decompressed content is {digest.hexdigest()}, expected {md5}")
    except (OSError, http.client.HTTPException, zlib.error, ValueError) as error:
        # Past the deadline, deadline_at has interrupted the fetch: whatever broke, that is why.
        if time.monotonic() >= expires:
            raise TimeoutError(f"no complete file within {deadline:g} s ({DEADLINE_VARIABLE})") from error
        raise
    print(f"{target.name}: verified, from {url}")


@contextmanager
def deadline_at(expires: float) -> Iterator[None]:
    """Interrupt whatever the block waits for (resolving, connecting, headers, body) at time `expires`.

    A socket timeout bounds each read, not the whole file: a server that sends a byte now and then,
    of its headers or of its body, would never trip it. SIGALRM interrupts the read where it waits.
    Without SIGALRM (Windows) or outside the main thread only the per-read timeout applies.
    """
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(received: int, frame: object) -> None:
        raise TimeoutError("deadline passed")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(expires - time.monotonic(), 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def describe(error: Exception) -> str:
    """A short reason for a failed fetch, without the traceback."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    if isinstance(error, zlib.error):
        return f"not a valid gzip file ({error})"
    return str(error)
