"""The portable arithmetic as a whole: no operation of the pipeline whose bits depend on the CPU,
and the same bytes from the real pipeline when what differs between CPUs is changed.

Only one CPU is at hand, so another is simulated by changing what tells CPUs apart: MKL's code
path (MKL_CBWR=COMPATIBLE is the one MKL takes on AMD CPUs; MKL_ENABLE_INSTRUCTIONS=AVX2 that of
an older Intel), the instruction set oneDNN may use, and the thread count. Each change is shown
to reach the machine's own arithmetic (a negative control), or the control says why it cannot.
"""

import dataclasses
import hashlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import (
    PROJECT,
    TRAIN_PARAMS,
    copy_project,
    export_files,
    run,
    set_params,
    stage_command,
    synthetic_split,
    user_environment,
)

# torch's base class for seeing every ATen operation, backward's and TorchScript's included; it has no
# public name, and a change there fails this module at its import, loudly.
from torch.utils._python_dispatch import TorchDispatchMode

from mnist_pipeline.data import to_tensors
from mnist_pipeline.exact import exact_products_used, use_exact_products
from mnist_pipeline.metrics import evaluate
from mnist_pipeline.model import MLP
from mnist_pipeline.params import AugmentParams
from mnist_pipeline.shipped import ShippedMLP, evaluate_shipped
from mnist_pipeline.torchscript import load_torchscript
from mnist_pipeline.training import train

EVERY_DEFORMATION = AugmentParams(rotation=15, scale=0.15, shear=10, translation=2, elastic_alpha=34, elastic_sigma=5)

# Every operation the pipeline's arithmetic may run, by the reason its bits are the same on every
# x86-64 CPU with AVX2. An operation not listed fails test_every_operation_gives_the_same_bits_on_every_cpu:
# find out which code computes it before adding it (torch's sin, cos, tan, exp and log, for one,
# are MKL's vector math, whose results differ between CPUs: mnist_pipeline/elementary.py has ours).
MACHINE_INDEPENDENT = {
    "moves, views or makes data without arithmetic": (
        "_local_scalar_dense _unsafe_view alias arange as_strided cat clone copy_ detach empty empty_like "
        "empty_strided expand index_select lift_fresh new_empty nonzero ones_like permute select set_ slice stack "
        "transpose unbind unsqueeze view zeros zeros_like"
    ),
    "exact, or one correctly rounded IEEE 754 operation per element": (
        "_to_copy abs add add_ amax aminmax argmax bitwise_not clamp div div_ eq frexp gt lt masked_fill "
        "masked_fill_ max min mul mul_ ne neg reciprocal relu round_ rsub sub sub_ threshold_backward"
    ),
    "ATen's kernels, pinned to their AVX2 versions on every CPU (numerics.py)": (
        "_foreach_add_ _fused_adamw_ _fused_sgd_ _log_softmax _log_softmax_backward_data grid_sampler_2d "
        "nll_loss_backward nll_loss_forward sum"
    ),
    "a seeded generator of the CPU, drawing one number after another": "rand randint randperm",
    "a matrix product: checked by ProductsChecked to be exact, or to reach the exact kernels": "mm bmm",
}
KNOWN = {name for names in MACHINE_INDEPENDENT.values() for name in names.split()}


class ProductsChecked(TorchDispatchMode):
    """Records every operation's name, and checks every matrix product: a float32 one must reach the
    exact kernels (use_exact_products on), or be exact as the BLAS library computes it (the shipped
    model's, on its grids): in float32, equal to the float64 product of the same operands; in float64
    (augmentation's smoothing), a product of integers equal to the int64 one."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()
        self.problems: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.seen[name] += 1
        result = func(*args, **kwargs)
        if name in ("mm", "bmm"):
            a, b = args[0], args[1]
            product = f"{func} of {a.dtype} {tuple(a.shape)} and {tuple(b.shape)}"
            if func._overloadname == "default" and a.dtype == torch.float32 and exact_products_used():
                pass  # the exact kernels' (tests/test_exact.py)
            elif a.dtype == torch.float32:
                if not torch.equal(result.double(), a.double() @ b.double()):
                    self.problems.append(f"{product}: not exact")
            elif not (torch.equal(a, a.round()) and torch.equal(b, b.round())):
                self.problems.append(f"{product}: not of integers")
            elif not torch.equal(result, (a.long() @ b.long()).to(result.dtype)):
                self.problems.append(f"{product}: not exact")
        return result


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_every_operation_gives_the_same_bits_on_every_cpu(tmp_path, optimizer):
    """A short portable training with every deformation and the per-epoch test passes (epoch 0
    included), then evaluate's pass and the exported files, as the stages run them."""
    images, labels = to_tensors(*synthetic_split(256, seed=0), torch.device("cpu"))
    test_images, test_labels = to_tensors(*synthetic_split(100, seed=1), torch.device("cpu"))
    params = dataclasses.replace(
        TRAIN_PARAMS, optimizer=optimizer, schedule="onecycle", label_smoothing=0.1, epochs=1, batch_size=64
    )
    torch.manual_seed(1)
    model = MLP([32, 16])
    checked = ProductsChecked()

    def report(row: dict) -> None:
        evaluate_shipped(model, test_images, test_labels)

    with checked:
        train(model, images, labels, params, EVERY_DEFORMATION, report)
    use_exact_products(False)  # the evaluate and export stages do not turn them on
    pixels = test_images.view(-1, 28, 28)
    with checked:
        expected = evaluate(ShippedMLP(model), test_images, test_labels).logits
    export_files(model, tmp_path, pixels)  # which checks the files' logits against `expected`'s arithmetic
    with checked:
        scripted = load_torchscript(tmp_path / "model.pt")
        program = torch.export.load(tmp_path / "model.pt2").module()
        exported = [scripted(pixels), program(pixels.unsqueeze(1).float() / 255)]
        scripted.probabilities(pixels)
    assert all(torch.equal(logits, expected) for logits in exported)
    assert not checked.problems
    assert checked.seen["mm"] and checked.seen["grid_sampler_2d"] and checked.seen["frexp"]  # it saw them all
    unknown = sorted(set(checked.seen) - KNOWN)
    assert not unknown, f"operations not known to give the same bits on every CPU: {unknown}"


def test_the_products_check_catches_a_product_that_escapes():
    """The negative control of the test above: torch's own float32 product of operands off any grid is
    caught, and so is a product of non-integers that reaches the library in float64."""
    a, b = torch.rand(4, 5), torch.rand(5, 3)
    checked = ProductsChecked()
    with checked:
        a @ b  # exact products off
        torch.mm(a, b, out=torch.empty(4, 3))  # the out= variant, which use_exact_products leaves to torch
        a.double() @ b.double()
    assert [problem.rsplit(": ", 1)[1] for problem in checked.problems] == ["not exact", "not exact", "not of integers"]


# --- The real pipeline, run as a user runs it, with what tells CPUs apart changed ---------------

# Each an environment that makes this machine compute as another CPU may. MKL reads MKL_CBWR and
# MKL_ENABLE_INSTRUCTIONS, oneDNN ONEDNN_MAX_CPU_ISA, and OpenMP (so torch) OMP_NUM_THREADS.
OTHER_CPUS = {
    "MKL's path for AMD CPUs, 3 threads": {"MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "3"},
    "an AVX2-only CPU": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "1 thread, oneDNN held to SSE4.1": {"OMP_NUM_THREADS": "1", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def output_hashes(project: Path) -> dict[str, str]:
    """The sha256 of every output of the pipeline (dvc.yaml's outs, metrics and plots), by path."""
    files = [*(project / "metrics").rglob("*.*"), *(project / "models").glob("*.*")]
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, synthetic_mirror):
    """A copy of the project after `dvc repro` on synthetic data (one epoch with every deformation on),
    its dvc.lock and the hashes of its outputs."""
    directory, checksums = synthetic_mirror
    project = copy_project(tmp_path_factory.mktemp("portable"), checksums)
    set_params(project, epochs=1)
    set_params(project, "augment", **dataclasses.asdict(EVERY_DEFORMATION))
    run(project, "dvc", "repro", mirror=str(directory))
    outputs = output_hashes(project)
    assert {Path(path).name for path in outputs} >= {"eval.json", "loss.tsv", "augmented.gif", "model.pt", "model.pt2"}
    return project, str(directory), (project / "dvc.lock").read_bytes(), outputs


@pytest.mark.parametrize("cpu", OTHER_CPUS)
def test_the_pipeline_gives_the_same_bytes_on_another_cpu(pipeline, cpu):
    """Train, evaluate and export run again (the download's files are checked by their md5 anyway)."""
    project, mirror, lock, outputs = pipeline
    result = run(project, "dvc", "repro", "--force", "--downstream", "train", mirror=mirror, **OTHER_CPUS[cpu])
    assert result.stdout.count("Running stage") == 3
    assert (project / "dvc.lock").read_bytes() == lock
    assert output_hashes(project) == outputs


def checkpoint_of_native_training(project: Path, **variables: str) -> bytes:
    """The checkpoint of the train stage's own command with train.arithmetic native, run with `variables`."""
    run(project, *stage_command(project, "train"), **variables)
    return (project / "models" / "checkpoint.pt").read_bytes()


@pytest.fixture(scope="module")
def native(tmp_path_factory, synthetic_mirror):
    """A copy with the data in place, set to train natively (one epoch, every deformation on)."""
    directory, checksums = synthetic_mirror
    project = copy_project(tmp_path_factory.mktemp("native"), checksums)
    set_params(project, epochs=1, arithmetic="native")
    set_params(project, "augment", **dataclasses.asdict(EVERY_DEFORMATION))
    run(project, "dvc", "repro", "download", mirror=str(directory))
    return project, checkpoint_of_native_training(project)


@pytest.mark.parametrize("cpu", OTHER_CPUS)
def test_each_other_cpu_changes_the_native_arithmetic(native, cpu):
    """The negative control: the same change does reach the machine's own products."""
    project, expected = native
    if checkpoint_of_native_training(project, **OTHER_CPUS[cpu]) == expected:
        pytest.skip(f"{cpu} ({OTHER_CPUS[cpu]}) leaves the native training unchanged on this CPU")


# torch's tangent and exponential on fixed values, as a hash: MKL's vector math computes them.
HASH_VECTOR_MATH = """
import hashlib, torch
x = torch.linspace(-1.5, 1.5, 10001)
print(hashlib.sha256(torch.tan(x).numpy().tobytes() + torch.exp(x).numpy().tobytes()).hexdigest())
"""


def test_mkls_code_path_changes_torchs_own_elementary_functions():
    """The negative control for augmentation, whose sines and cosines torch's own functions would give:
    the change of MKL's code path that the pipeline above shrugs off does change them."""
    hashes = {
        branch: subprocess.run(
            [sys.executable, "-c", HASH_VECTOR_MATH],
            cwd=PROJECT,
            env=user_environment(**({"MKL_CBWR": branch} if branch else {})),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for branch in ("", "COMPATIBLE")
    }
    if len(set(hashes.values())) == 1:
        pytest.skip("MKL takes its COMPATIBLE path on this CPU already (an AMD CPU's)")
