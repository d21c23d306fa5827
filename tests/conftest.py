"""Shared fixtures: small synthetic MNIST files, and temporary copies of the project."""

import gzip
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from mnist_pipeline.numerics import KERNELS, pin_kernels
from mnist_pipeline.params import AugmentParams, TrainParams

# The tests that train in this process compute as the stages do, with the numeric settings that
# each stage makes before torch loads. Commands run as a user runs them (`run`) go without them.
pin_kernels()
# A suite started in the background inherits SIGINT ignored, and so would every stage it starts,
# where a user's Ctrl-C reaches a stage started from a terminal: a handler here (unlike an ignored
# signal) is not inherited, so the stages start with SIGINT's default, as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

PROJECT = Path(__file__).resolve().parent.parent

# `make test` runs the modules on two workers (pytest-xdist, a module to a worker, so that each
# module's fixtures run once), which take them in the order collected (--no-loadscope-reorder). First
# the real data's module, whose baseline training is the longest run of the suite: the other worker
# meanwhile takes the modules that compute in its own process, on one thread (below), which leave that
# training a core of its own, instead of starting pipelines that would wait for its cores. Then the
# slowest modules first, so that the workers finish together instead of one waiting for the other's
# last long module.
FIRST_MODULE = "test_real_mnist"
SLOWEST_MODULES = (
    "test_experiments",
    "test_portable",
    "test_pipeline",
    "test_distributed",
    "test_resume",
    "test_faults",
    "test_export",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.stem
        if name == FIRST_MODULE:
            return 0
        return 2 + SLOWEST_MODULES.index(name) if name in SLOWEST_MODULES else 1

    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> None:
    """What the tests compute in this process, they compute on one thread: each of the two workers then
    keeps to a core, and neither makes the other's OpenMP threads (or a pipeline's) wait at every
    operation (see cores.py). A test that needs other counts sets them, and sets this one back.
    (torch is imported here, in the workers alone, after pin_kernels().)"""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def torch_products_between_tests() -> Iterator[None]:
    """A test that trains in the portable arithmetic turns exact products on for the whole process (as a
    stage does): the next test starts with torch's own again."""
    yield
    from mnist_pipeline.exact import use_exact_products  # imports torch, which must load after pin_kernels()

    use_exact_products(False)


# Small settings for the unit tests of training and the optimizer; each test changes what it needs.
TRAIN_PARAMS = TrainParams(
    optimizer="sgd",
    lr=0.05,
    momentum=0.5,
    weight_decay=0.0,
    label_smoothing=0.0,
    schedule="constant",
    batch_size=32,
    epochs=3,
    seed=1,
    device="cpu",
    precision="fp32",
    arithmetic="portable",
    num_threads=0,
    nproc=1,
    nnodes=1,
)
NO_AUGMENTATION = AugmentParams(
    rotation=0.0, scale=0.0, shear=0.0, translation=0.0, elastic_alpha=0.0, elastic_sigma=0.0
)
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file holding `array`, written independently of the code under test."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images where each class lights up its own 6x6 patch: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for index, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        images[index, 2 + 12 * row : 8 + 12 * row, 2 + 5 * col : 8 + 5 * col] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_mirror(directory: Path, n_train: int = 600, n_test: int = 200) -> str:
    """Write the four gzipped IDX files of a synthetic dataset; return their md5sum-style table."""
    directory.mkdir(parents=True, exist_ok=True)
    table = []
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = synthetic_split(n, seed)
        for name, array in zip(FILES[split], (images, labels), strict=True):
            content = idx_bytes(array)
            (directory / f"{name}.gz").write_bytes(gzip.compress(content, mtime=0))
            table.append(f"{hashlib.md5(content).hexdigest()}  {name}\n")
    return "".join(table)


@pytest.fixture(scope="session")
def synthetic_mirror(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A directory of synthetic .gz files and their checksum table."""
    directory = tmp_path_factory.mktemp("mirror")
    return directory, write_mirror(directory)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A loopback HTTP server: files put under the returned directory are served at the returned URL."""
    root = tmp_path_factory.mktemp("http")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def copy_project(destination: Path, checksums: str | None = None) -> Path:
    """Copy the project into `destination` (a fresh git repo), optionally with its own checksum table."""
    # What git would commit: sources, config and committed metrics, not .venv or DVC outputs.
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (PROJECT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / name, destination / name)
    if checksums is not None:
        (destination / "data" / "mnist.md5").write_text(checksums)
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    # A repo-local identity: DVC commits experiments, and CI machines may have no global one.
    subprocess.run(["git", "config", "user.name", "test"], cwd=destination, check=True)
    subprocess.run(["git", "config", "user.email", "test@example.com"], cwd=destination, check=True)
    subprocess.run(["git", "add", "-A"], cwd=destination, check=True)
    subprocess.run(["git", "commit", "-qm", "copy"], cwd=destination, check=True)
    return destination


# Far beyond any command of the suite (the longest, the real baseline's `dvc repro`, takes about a
# minute), so that only a hang reaches it, even on a slow and busy machine.
COMMAND_TIMEOUT = 900


def set_params(project: Path, section: str = "train", **values: object) -> None:
    """Overwrite values of a section (train.* unless named) in a copy's params.yaml."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def bare_environment() -> dict[str, str]:
    """This test run's environment without what a user's shell would not have: no numeric settings or
    PYTHONHASHSEED (the stages must make their own), no PYTHONPATH (the code that a copy's stages
    import must be the copy's own, found as a user's dvc finds it) and no MNIST_MIRROR."""
    return {k: v for k, v in os.environ.items() if k not in ("MNIST_MIRROR", "PYTHONHASHSEED", "PYTHONPATH", *KERNELS)}


def user_environment(mirror: str | None = None, tools: Path | None = None, **variables: str) -> dict[str, str]:
    """A user's environment (see bare_environment) with this project's environment activated, as
    `source .venv/bin/activate` does it and nothing more, plus MNIST_MIRROR=`mirror`, `tools` (a
    directory, e.g. with a stand-in command) first on the PATH, and `variables`.
    """
    env = bare_environment()
    first = [str(tools)] if tools else []
    venv = Path(sys.executable).parent
    env["PATH"] = os.pathsep.join([*first, str(venv), env["PATH"]])
    env["VIRTUAL_ENV"] = str(venv.parent)
    if mirror is not None:
        env["MNIST_MIRROR"] = mirror
    return env | variables


def start(project: Path, command: list[str] | tuple[str, ...], env: dict[str, str]) -> subprocess.Popen:
    """`command` started in `project` with `env`, in a session of its own, so that it can be killed
    with every process it starts (a stage under dvc, its ranks)."""
    return subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def run(
    project: Path,
    *command: str,
    mirror: str | None = None,
    check: bool = True,
    tools: Path | None = None,
    **variables: str,
) -> subprocess.CompletedProcess:
    """Run a command (dvc, python, ...) in `project` as a user would (see user_environment).

    A command still running after COMMAND_TIMEOUT is a hang: it is killed, with every process it
    started (a stage under dvc, its ranks), so that none is left holding CPU cores, and fails the test.
    """
    process = start(project, command, user_environment(mirror, tools, **variables))
    try:
        stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command)} hung for {COMMAND_TIMEOUT} s:\n{stdout}\n{stderr}") from None
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@contextmanager
def started(project: Path, command: list[str], until: str, **variables: str) -> Iterator[subprocess.Popen]:
    """`command` started in `project` as a user would (see user_environment), yielded once a line of
    its output starts with `until`.

    No timing is assumed, but no wait is endless either: a command that has not said so after
    COMMAND_TIMEOUT fails the test. When the block ends, the command is killed if it still runs,
    with every process it started, so that none is left holding the CPU cores that later
    trainings wait for.
    """
    # Unbuffered, so that the line arrives through the pipe when it is printed.
    process = start(project, command, user_environment(**variables) | {"PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(COMMAND_TIMEOUT, os.killpg, (process.pid, signal.SIGKILL))
    watchdog.start()
    try:
        found = any(line.startswith(until) for line in process.stdout)
        watchdog.cancel()
        if not found:
            raise AssertionError(f"{' '.join(command)} ended without saying {until!r}: {process.communicate()}")
        yield process
    finally:
        watchdog.cancel()
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


@contextmanager
def training(project: Path, until: str = "training on", **params: object) -> Iterator[subprocess.Popen]:
    """The train stage's own command with these train params, yielded once a line of its output starts
    with `until` (by default, once it says it is training); killed, with its ranks, when the block ends
    (see started), and params.yaml restored."""
    set_params(project, **params)
    try:
        with started(project, stage_command(project, "train"), until=until) as process:
            yield process
    finally:
        run(project, "git", "checkout", "--", "params.yaml")


# The train stage's outputs (dvc.yaml's outs, metrics and plots of the stage).
TRAIN_OUTPUTS = ("models/checkpoint.pt", "metrics/augmented.gif", "metrics/train")


def train_outputs(project: Path) -> dict[str, object]:
    """The train stage's outputs, by path: a file's bytes, a folder's (DVCLive's) files' bytes by name,
    None where absent."""
    outputs: dict[str, object] = {}
    for name in TRAIN_OUTPUTS:
        path = project / name
        if path.is_dir():
            outputs[name] = {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
        else:
            outputs[name] = path.read_bytes() if path.exists() else None
    return outputs


def remove_train_outputs(project: Path) -> None:
    """Remove the train stage's outputs, as DVC does before it runs the stage."""
    from mnist_pipeline.stage import remove_output

    for name in TRAIN_OUTPUTS:
        remove_output(project / name)


def export_files(model, directory: Path, images):
    """models/model.pt and model.pt2 of the MLP `model` in `directory`, written and checked as the export
    stage does, on uint8 `images` [N, 28, 28]; returns the logits they were checked to give: evaluate's,
    the shipped model's (torch is imported here, after pin_kernels())."""
    import torch

    from mnist_pipeline.data import scale_pixels
    from mnist_pipeline.export import export_program, export_torchscript
    from mnist_pipeline.shipped import ShippedMLP

    shipped = ShippedMLP(model)
    with torch.no_grad():
        logits = shipped(scale_pixels(images))
    export_torchscript(shipped, directory / "model.pt", images, logits)
    export_program(shipped, directory / "model.pt2", images, logits)
    return logits


# What tells machines apart, one thing at a time, for a user of the exported files: ATen's kernels (each
# CPU runs the widest it has), MKL's code path (COMPATIBLE is the one it takes on AMD CPUs), the
# instruction set oneDNN may use, the thread count, and the precision the user's program allows its
# float32 products (bf16 products, through oneDNN, where the CPU has them). Each: (environment,
# torch.set_num_threads count or 0 for torch's own, torch.set_float32_matmul_precision). The AVX-512
# kernels need a CPU that has AVX-512.
ELSEWHERE = {
    "as installed": ({}, 0, "highest"),
    "ATen's scalar kernels": ({"ATEN_CPU_CAPABILITY": "default"}, 0, "highest"),
    "ATen's AVX2 kernels": ({"ATEN_CPU_CAPABILITY": "avx2"}, 0, "highest"),
    "ATen's AVX-512 kernels": ({"ATEN_CPU_CAPABILITY": "avx512"}, 0, "highest"),
    "MKL's path for AMD CPUs": ({"MKL_CBWR": "COMPATIBLE"}, 0, "highest"),
    "oneDNN held to AVX2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, 0, "highest"),
    "1 thread": ({"OMP_NUM_THREADS": "1"}, 1, "highest"),
    "3 threads": ({"OMP_NUM_THREADS": "3"}, 3, "highest"),  # which torch caps at the cores: hence set_num_threads
    "bf16 products allowed": ({}, 0, "medium"),
}
CONSUMER = PROJECT / "tests" / "consumer.py"


def consume(
    setting: str, images: Path, labels: Path, models: list[str], batches: str = "0,1000,7,1"
) -> dict[str, dict]:
    """tests/consumer.py's JSON for `models` (paths, each with its own batch sizes after an @ if need
    be) on an IDX pair, by path, run with the ELSEWHERE `setting` in an isolated Python started from
    /, which cannot import the project (checked). It holds the machine's cores meanwhile, as the
    stages do (cores.py): its threads beside other tests' trainings would only slow both down."""
    import torch

    from mnist_pipeline.cores import machine_cores, reserved_cores

    variables, threads, precision = ELSEWHERE[setting]
    capabilities = torch.cpu.get_capabilities()
    if "avx512" in variables.values() and not all(capabilities.get(f"avx512_{x}") for x in ("f", "bw", "vl", "dq")):
        pytest.skip("ATen's AVX-512 kernels need a CPU with AVX-512 F, BW, VL and DQ")
    command = [sys.executable, "-I", "-W", "ignore::FutureWarning", str(CONSUMER), str(threads), precision, batches]
    with reserved_cores(machine_cores()):
        result = run(Path("/"), *command, str(images), str(labels), *models, **variables)
    output = json.loads(result.stdout)
    assert output["imported"] == [], "the consumer imported the project's code"
    assert threads in (0, output["threads"]) and output["precision"] == precision
    if "ATEN_CPU_CAPABILITY" in variables:
        assert output["kernels"] == variables["ATEN_CPU_CAPABILITY"].upper()
    return output["models"]


def stage_command(project: Path, stage: str) -> list[str]:
    """The command dvc.yaml gives `stage`, as arguments."""
    return shlex.split(yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]["cmd"])
