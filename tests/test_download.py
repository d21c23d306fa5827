import gzip
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import FILES, PROJECT, user_environment, write_mirror

from mnist_pipeline import download
from mnist_pipeline.download import (
    OFFICIAL_MIRRORS,
    PUBLISHED_SIZES,
    download_deadline,
    download_mnist,
    mirror_list,
    read_checksums,
    size_limit,
)
from mnist_pipeline.stage import PipelineError

# How a faulty server answers: given the request's handler, and an event set when the test ends.
Respond = Callable[[BaseHTTPRequestHandler, threading.Event], None]


@pytest.fixture
def mirror(tmp_path):
    """A local mirror directory with synthetic files, and the checksums they satisfy."""
    directory = tmp_path / "mirror"
    table = write_mirror(directory, n_train=30, n_test=10)
    (tmp_path / "mnist.md5").write_text(table)
    return directory, read_checksums(tmp_path / "mnist.md5")


def test_read_checksums_parses_an_md5sum_table(tmp_path):
    (tmp_path / "sums").write_text("6BBC9ACE898E44AE57DA46A324031ADB  train-images-idx3-ubyte\n\n")
    assert read_checksums(tmp_path / "sums") == {"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb"}


def test_read_checksums_names_the_bad_line(tmp_path):
    (tmp_path / "sums").write_text("6bbc9ace898e44ae57da46a324031adb  a\nnot-a-checksum b\n")
    with pytest.raises(PipelineError, match=r"sums:2: expected '<md5> <file name>', got 'not-a-checksum b'"):
        read_checksums(tmp_path / "sums")


def test_the_project_pins_the_published_checksums():
    assert read_checksums(PROJECT / "data" / "mnist.md5") == {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }


def test_mirror_list_puts_mnist_mirror_first_and_resolves_relative_paths(tmp_path):
    assert mirror_list(None, tmp_path) == list(OFFICIAL_MIRRORS)
    assert mirror_list("http://example.org/mnist", tmp_path) == ["http://example.org/mnist/", *OFFICIAL_MIRRORS]
    local = mirror_list("../datasets/mnist", tmp_path / "project")
    assert local[0] == (tmp_path / "datasets" / "mnist").as_uri() + "/"
    assert local[1:] == list(OFFICIAL_MIRRORS)


def test_download_from_a_local_directory_decompresses_and_verifies(tmp_path, mirror):
    directory, checksums = mirror
    data = tmp_path / "data"
    download_mnist(data, checksums, mirror_list(str(directory), tmp_path))
    assert sorted(p.name for p in data.iterdir()) == sorted(checksums)
    for name, md5 in checksums.items():
        content = (data / name).read_bytes()
        assert content == gzip.decompress((directory / f"{name}.gz").read_bytes())
        assert hashlib.md5(content).hexdigest() == md5


def test_download_over_http_falls_back_to_the_next_mirror(tmp_path, mirror, http_root):
    directory, checksums = mirror
    root, url = http_root
    shutil.copytree(directory, root / "good", dirs_exist_ok=True)
    (root / "corrupt").mkdir(exist_ok=True)
    for name in checksums:  # same names, wrong content: fails verification
        (root / "corrupt" / f"{name}.gz").write_bytes(gzip.compress(b"not mnist"))
    data = tmp_path / "data"
    download_mnist(data, checksums, [f"{url}/missing/", f"{url}/corrupt/", f"{url}/good/"])
    assert sorted(p.name for p in data.iterdir()) == sorted(checksums)


def test_when_every_mirror_fails_the_error_lists_each_and_nothing_is_left(tmp_path, mirror, http_root):
    directory, checksums = mirror
    root, url = http_root
    (root / "notgzip").mkdir(exist_ok=True)
    (root / "truncated").mkdir(exist_ok=True)
    for name in checksums:
        (root / "notgzip" / f"{name}.gz").write_bytes(b"plain text, not gzip")
        (root / "truncated" / f"{name}.gz").write_bytes((directory / f"{name}.gz").read_bytes()[:-20])
    data = tmp_path / "data"
    mirrors = [f"{url}/missing/", f"{url}/notgzip/", f"{url}/truncated/", (tmp_path / "nowhere").as_uri() + "/"]
    with pytest.raises(PipelineError) as error:
        download_mnist(data, checksums, mirrors)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("could not get train-images-idx3-ubyte.gz from any mirror: ")
    assert f"{url}/missing/: HTTP 404" in message
    assert f"{url}/notgzip/: not a valid gzip file" in message
    assert f"{url}/truncated/: truncated gzip stream" in message
    assert "nowhere/: [Errno 2] No such file or directory" in message
    assert not data.exists() and not list(tmp_path.glob(".data*"))  # no dataset, no leftovers


def test_a_checksum_mismatch_is_reported_with_both_values(tmp_path, mirror):
    directory, checksums = mirror
    wrong = dict.fromkeys(checksums, "0" * 32)
    with pytest.raises(PipelineError, match=r"md5 of decompressed content is [0-9a-f]{32}, expected 0{32}"):
        download_mnist(tmp_path / "data", wrong, [directory.as_uri() + "/"])
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob(".data*"))


def test_a_failure_after_some_files_leaves_no_partial_dataset_and_keeps_the_old_one(tmp_path, mirror):
    directory, checksums = mirror
    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    (data / "previous").write_text("the dataset from before")
    last = list(checksums)[-1]
    broken = {**checksums, last: "0" * 32}  # every file verifies but the last
    with pytest.raises(PipelineError, match=f"could not get {last}.gz"):
        download_mnist(data, broken, [directory.as_uri() + "/"])
    assert [p.name for p in data.iterdir()] == ["previous"]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["mnist"]
    download_mnist(data, checksums, [directory.as_uri() + "/"])
    assert sorted(p.name for p in data.iterdir()) == sorted(checksums)


def test_a_stale_temporary_folder_with_this_pid_does_not_end_up_in_the_dataset(tmp_path, mirror):
    # What a process killed with SIGKILL leaves, found by a later one with the same pid (containers).
    directory, checksums = mirror
    stale = tmp_path / f".data.{os.getpid()}.tmp"
    stale.mkdir()
    (stale / "leftover").write_text("from a killed run")
    (stale / f".train-images-idx3-ubyte.{os.getpid()}.tmp").write_bytes(b"half a file")
    download_mnist(tmp_path / "data", checksums, [directory.as_uri() + "/"])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(checksums)
    assert not stale.exists()


def test_the_deadline_defaults_to_300_s_and_takes_fractions():
    assert download_deadline(None) == download_deadline("") == 300
    assert download_deadline("2.5") == 2.5


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan", "1e999", "1e12"])
def test_a_bad_deadline_is_one_line_naming_the_variable_and_the_value(value):
    with pytest.raises(PipelineError) as error:
        download_deadline(value)
    assert str(error.value) == (
        "MNIST_DOWNLOAD_DEADLINE must be a number of seconds for each file above 0 and up to 86400 "
        f"(default 300), got {value!r}"
    )


def test_the_size_limit_is_the_published_size_or_for_other_names_the_largest():
    assert size_limit("train-labels-idx1-ubyte") == 60008
    assert size_limit("emnist-letters-train-images-idx3-ubyte") == max(PUBLISHED_SIZES.values()) == 47040016


@pytest.fixture
def serve() -> Iterator[Callable[[Respond], str]]:
    """Start loopback HTTP servers that answer every GET with a `Respond`; return each one's URL.

    At the end of the test, the event given to the responses is set (a stalled one returns),
    and every server is stopped.
    """
    release = threading.Event()
    servers = []

    def start(respond: Respond) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with suppress(OSError):  # the client gave up on this server, as the tests expect
                    respond(self, release)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    release.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def send_headers(handler: BaseHTTPRequestHandler, length: int) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(length))
    handler.end_headers()


# How long a slow server keeps a connection open before it gives up: a client that ignored its
# deadline then sees a broken download, and the test fails with that, instead of hanging.
GIVE_UP_SECONDS = 60


def trickle(body: bytes) -> Respond:
    """A server that sends `body` one byte every 0.2 s: each read gets something, the file never ends."""

    def respond(handler: BaseHTTPRequestHandler, release: threading.Event) -> None:
        send_headers(handler, len(body))
        for index in range(min(len(body), GIVE_UP_SECONDS * 5)):
            if release.wait(0.2):
                return
            handler.wfile.write(body[index : index + 1])

    return respond


def stall(body: bytes) -> Respond:
    """A server that sends the headers and half of `body`, then nothing until the test ends."""

    def respond(handler: BaseHTTPRequestHandler, release: threading.Event) -> None:
        send_headers(handler, len(body))
        handler.wfile.write(body[: len(body) // 2])
        release.wait(GIVE_UP_SECONDS)

    return respond


def trickle_headers(body: bytes) -> Respond:
    """A server that sends its status line, then header bytes one every 0.2 s, never reaching the body."""

    def respond(handler: BaseHTTPRequestHandler, release: threading.Event) -> None:
        handler.wfile.write(b"HTTP/1.0 200 OK\r\n")
        for _ in range(GIVE_UP_SECONDS * 5):
            if release.wait(0.2):
                return
            handler.wfile.write(b"X")

    return respond


@pytest.mark.parametrize("fault", [trickle, stall, trickle_headers])
def test_a_slow_mirror_fails_at_the_deadline_and_the_next_one_is_used(tmp_path, mirror, serve, capsys, fault):
    directory, checksums = mirror
    name = "train-images-idx3-ubyte"  # one file: each bad mirror costs the whole deadline
    body = (directory / f"{name}.gz").read_bytes()
    slow = serve(fault(body))
    started = time.monotonic()
    # The deadline binds the good mirror too: 3 s for a small local file leaves room for a machine
    # that stalls this process for a while (a 1 s deadline could fail the test under load).
    download_mnist(tmp_path / "data", {name: checksums[name]}, [slow, directory.as_uri() + "/"], deadline=3)
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    assert f"{name}.gz: {slow}: no complete file within 3 s (MNIST_DOWNLOAD_DEADLINE); trying the next mirror" in out
    assert f"{name}: verified, from {directory.as_uri()}/" in out
    assert elapsed >= 3  # the slow mirror had its whole deadline
    assert (tmp_path / "data" / name).read_bytes() == gzip.decompress(body)


def test_a_gzip_bomb_is_cut_off_at_the_published_size(tmp_path, mirror, http_root, monkeypatch, capsys):
    directory, checksums = mirror
    root, url = http_root
    name = "train-labels-idx1-ubyte"
    bomb = gzip.compress(bytes(64 << 20), mtime=0)  # 64 MiB of zeros, 1000 times the published size
    assert len(bomb) < 100_000
    (root / "bomb").mkdir(exist_ok=True)
    (root / "bomb" / f"{name}.gz").write_bytes(bomb)
    written = []  # the size of each temporary file, as it was when closed
    atomic_output = download.atomic_output

    @contextmanager
    def recorded(path: Path, mode: str = "wb") -> Iterator:
        with atomic_output(path, mode) as file:
            try:
                yield file
            finally:
                written.append(file.tell())

    monkeypatch.setattr(download, "atomic_output", recorded)
    download_mnist(tmp_path / "data", {name: checksums[name]}, [f"{url}/bomb/", directory.as_uri() + "/"])
    out = capsys.readouterr().out
    assert f"{name}.gz: {url}/bomb/: decompresses to more than the expected 60008 bytes; trying the next mirror" in out
    assert len(written) == 2 and written[0] <= PUBLISHED_SIZES[name]
    assert (tmp_path / "data" / name).read_bytes() == gzip.decompress((directory / f"{name}.gz").read_bytes())


@pytest.fixture
def start_stage(tmp_path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start `python -m stages.download` as DVC would, from this checkout, into tmp_path/data/mnist.

    Arguments: the checksum table's text, then environment variables (MNIST_MIRROR=...). A stage
    still running at the end of the test is killed.
    """
    stages = []

    def start(checksums: str, **variables: str) -> subprocess.Popen:
        env = {k: v for k, v in user_environment().items() if k not in ("MNIST_DOWNLOAD_DEADLINE", "DVC_ROOT")}
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave no __pycache__ in the checkout
        table, out = tmp_path / "mnist.md5", tmp_path / "data" / "mnist"
        table.write_text(checksums)
        stage = subprocess.Popen(
            [sys.executable, "-m", "stages.download", "--checksums", table, "--out", out],
            cwd=PROJECT,
            env=env | variables,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stages.append(stage)
        return stage

    yield start
    for stage in stages:
        if stage.poll() is None:
            stage.kill()
        stage.communicate()


def wait_for_partial_file(folder: Path, stage: subprocess.Popen) -> None:
    """Wait until some decompressed bytes are in a temporary file under `folder`: the stage is mid-download."""
    give_up = time.monotonic() + 60
    while not any(f.stat().st_size for f in folder.rglob("*.tmp") if f.is_file()):
        assert stage.poll() is None, f"the stage ended ({stage.returncode}) before writing: {stage.communicate()}"
        assert time.monotonic() < give_up, "no temporary file with data after 60 s"
        time.sleep(0.05)


def test_the_stage_reports_a_bad_deadline_in_one_line(synthetic_mirror, start_stage):
    directory, checksums = synthetic_mirror
    stage = start_stage(checksums, MNIST_MIRROR=str(directory), MNIST_DOWNLOAD_DEADLINE="soon")
    _, stderr = stage.communicate(timeout=60)
    assert stage.returncode == 1
    assert stderr.splitlines() == [
        "error: MNIST_DOWNLOAD_DEADLINE must be a number of seconds for each file above 0 and up to 86400 "
        "(default 300), got 'soon'"
    ]


def test_sigterm_mid_download_exits_143_and_leaves_no_temporary_files(tmp_path, synthetic_mirror, serve, start_stage):
    directory, checksums = synthetic_mirror
    stalled = serve(stall((directory / "train-images-idx3-ubyte.gz").read_bytes()))
    stage = start_stage(checksums, MNIST_MIRROR=stalled)
    wait_for_partial_file(tmp_path / "data", stage)
    stage.send_signal(signal.SIGTERM)
    _, stderr = stage.communicate(timeout=60)
    assert stage.returncode == 143
    assert stderr.splitlines() == ["interrupted (SIGTERM)"]
    assert list((tmp_path / "data").rglob("*")) == []  # no dataset, no temporary file or folder


def test_after_sigkill_mid_download_the_next_run_succeeds(tmp_path, synthetic_mirror, serve, start_stage):
    directory, checksums = synthetic_mirror
    stalled = serve(stall((directory / "train-images-idx3-ubyte.gz").read_bytes()))
    stage = start_stage(checksums, MNIST_MIRROR=stalled)
    wait_for_partial_file(tmp_path / "data", stage)
    stage.kill()
    stage.communicate(timeout=60)
    assert list((tmp_path / "data").glob(".mnist.*.tmp"))  # nothing can clean up after SIGKILL
    rerun = start_stage(checksums, MNIST_MIRROR=str(directory))
    _, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted([*FILES["train"], *FILES["test"]])
