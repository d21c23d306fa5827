"""Matrix products with the same bits on every machine: the other half of the portable arithmetic.

A float32 matrix product adds its terms in the order its BLAS library picks for the CPU at hand
and the thread count, and float addition is not associative. MKL's products differ in their
last bits between an Intel and an AMD CPU, and between 1 and 2 threads, even with its
reproducibility settings (MKL_CBWR: docs/reproducibility.md), and SGD grows those bits into
different weights. Unless no addition rounds: here every operand is rounded to a grid of 2**8
steps below its largest magnitude, whose step (unit) is a power of two, so that each product of
two operands is an integer below 2**16 times the product of their units, and a sum of up to 256
of them an integer below 2**24 times it, which float32 holds exactly. The BLAS library's own
float32 product then returns exact sums of chunks of 256 terms, whatever order it adds in, on
any CPU, thread count or GPU; the chunks of a longer sum are added in a fixed order.

Each operand is rounded as a whole: a weight, a gradient, a batch of inputs (which so share a
grid, as in dynamic quantization, and keep exact the weights' gradients, which sum over the
batch). 8 significant bits below the largest magnitude, as bf16 keeps 8, but the sums are exact
where bf16's are not: every recipe's accuracy stays within the spread of its seeds
(docs/performance.md). In a distributed training each rank holds a share of the batch and rounds
it to the whole batch's grid (grids_of_the_whole_batch: one small all-reduce per operand): its
rows are then one process's, and its weight gradients exact parts of one process's, which
the ranks' all-reduce adds up exactly (docs/scaling.md). The model that ships rounds each
image's inputs to a grid of its own instead, so that an image's outputs do not depend on its
batch (shipped.py). The cost over
torch's own products is the rounding, three element-wise passes per operand, and Python's
dispatch: `make bench` measures it against train.arithmetic: native.

No product escapes: `use_exact_products()` registers, through torch.library, this module's
kernels for aten::linear (at the autograd level, so that ExactLinear computes both gradients)
and for every other float32 matrix product (mm, addmm, bmm, ..., on the CPU and CUDA). From
then on the process computes every one exactly, whichever code reaches it: a training step, a
product added later, a model of torch's own. (The shipped model's test passes pause them: its
operands are on their grids already, per image, and its products exact as torch computes them.)
"""

import functools
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed
from torch.nn import functional as F

from mnist_pipeline.numerics import KERNELS, X86_64
from mnist_pipeline.stage import PipelineError

GRID_BITS = 8  # steps of an operand's grid: 2**8 below its largest magnitude
FLOAT32_INTEGER_BITS = 24  # every integer up to 2**24 is exact in float32, and so is a sum that stays there
EXACT_TERMS = 2 ** (FLOAT32_INTEGER_BITS - 2 * GRID_BITS)  # 256 products of two operands sum exactly
# t + 1.5 * 2**23 * unit, less the same, is t rounded to a multiple of unit (for |t| < 2**22 * unit): the
# sum lies where float32's spacing is unit, and the subtraction is exact.
ROUNDING_SHIFT = 1.5 * 2.0**23
# Every largest magnitude counts as at least 2**-40, so that a unit, and the product of two, is a normal
# float32 (no subnormal numbers, which some kernels flush to zero); smaller values round to 0.
SMALLEST_EXPONENT = -40


def on_grid(t: torch.Tensor, whole_batch: bool = False) -> tuple[torch.Tensor, float]:
    """(rounded, unit): float32 `t` rounded as a whole to multiples of a power of two `unit`, below
    2**GRID_BITS units in magnitude (all NaN if `t` holds a NaN or an infinity). `whole_batch`: `t`
    is a rank's rows of a batch, rounded, inside grids_of_the_whole_batch, to the grid of every rank's."""
    low, high = (bound.item() for bound in torch.aminmax(t)) if t.numel() else (0.0, 0.0)  # a share may be empty
    largest = max(-low, high) if math.isfinite(low) and math.isfinite(high) else math.inf
    if whole_batch and _whole_batch:
        largest = largest_of_every_rank(largest, t.device)
    if not math.isfinite(largest):
        return torch.full_like(t, math.nan), math.nan
    exponent = max(math.frexp(largest)[1], SMALLEST_EXPONENT + 1)  # |t| < 2**exponent
    shift = rounding_shift(exponent - GRID_BITS, t.device)
    return t.add(shift).sub_(shift), 2.0 ** (exponent - GRID_BITS)


def largest_of_every_rank(largest: float, device: torch.device) -> float:
    """The largest of every rank's `largest` (an infinity if any is one)."""
    value = torch.tensor([largest], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(value, torch.distributed.ReduceOp.MAX)
    return value.item()


# Whether the ranks of a distributed training round their shares of a batch to the whole batch's grid.
_whole_batch = False


@contextmanager
def grids_of_the_whole_batch(ranks: bool) -> Iterator[None]:
    """Inside the block, if `ranks` (this process is a rank of a distributed training), ExactLinear
    rounds its input and its output's gradient, this rank's rows of a batch, to the grid that the whole
    batch sets: every rank takes part in an all-reduce for each. For a training step's forward and
    backward passes only: a pass of one rank alone (rank 0's evaluation) would wait for the others."""
    global _whole_batch
    was, _whole_batch = _whole_batch, ranks
    try:
        yield
    finally:
        _whole_batch = was


@functools.cache
def rounding_shift(exponent: int, device: torch.device) -> torch.Tensor:
    """ROUNDING_SHIFT * 2**exponent as a float32 scalar tensor: added to a tensor, unlike a Python
    float, it needs no conversion (a third of an addition's time on the MLP's tensors)."""
    return torch.tensor(ROUNDING_SHIFT * 2.0**exponent, dtype=torch.float32, device=device)


def library_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for matrices or batches of them, by the BLAS library itself: through the out= variant of
    mm or bmm, which use_exact_products leaves alone."""
    out = a.new_empty(*a.shape[:-1], b.shape[-1])
    return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out=out)


def grid_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for matrices on grids (on_grid): each chunk of up to EXACT_TERMS terms exact, by the library;
    the chunks of a longer sum added in order."""
    terms = a.shape[-1]
    size, batched = chunk_plan(terms)
    if size == terms:
        return library_product(a, b)
    if batched and a.dim() == 2:  # [chunks, M, size] @ [chunks, size, N]
        chunks = terms // size
        parts = library_product(a.reshape(len(a), chunks, size).transpose(0, 1), b.reshape(chunks, size, -1))
    else:
        parts = [library_product(a[..., i : i + size], b[..., i : i + size, :]) for i in range(0, terms, size)]
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


@functools.cache
def chunk_plan(terms: int) -> tuple[int, bool]:
    """(size, equal): the chunks a sum of `terms` terms is cut into, of at most EXACT_TERMS terms each, and
    whether they are equal, and so fit one batched product (when a count up to twice the least divides it)."""
    least = max(1, -(-terms // EXACT_TERMS))  # a sum of no terms too: one (empty) chunk
    equal = next((count for count in range(least, 2 * least + 1) if terms % count == 0), None)
    return (terms // equal, True) if equal else (-(-terms // least), False)


def grid_column_sums(t: torch.Tensor) -> torch.Tensor:
    """The column sums of `t`, on a grid of GRID_BITS bits: exact in chunks of rows, added in order."""
    rows = 2 ** (FLOAT32_INTEGER_BITS - GRID_BITS)
    total = t[:rows].sum(0)
    for first in range(rows, len(t), rows):
        total += t[first : first + rows].sum(0)
    return total


def exact_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for float32 matrices (or batches of them), each rounded to its grid."""
    return grid_product(on_grid(a)[0], on_grid(b)[0])


class ExactLinear(torch.autograd.Function):
    """F.linear (x @ weight.T + bias) for 2-dimensional x, and its gradients, by exact products: the
    operands rounded once each, x and the weight for both the forward product and a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x_grid, _ = on_grid(x, whole_batch=True)
        weight_grid, _ = on_grid(weight)
        ctx.save_for_backward(x_grid, weight_grid)
        y = grid_product(x_grid, weight_grid.T)  # exact_matmul(x, weight.T)
        return y if bias is None else y.add_(bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_grid, weight_grid = ctx.saved_tensors
        grad_grid, _ = on_grid(grad, whole_batch=True)
        grad_x = grid_product(grad_grid, weight_grid) if ctx.needs_input_grad[0] else None
        grad_weight = grid_product(grad_grid.T, x_grid) if ctx.needs_input_grad[1] else None
        grad_bias = grid_column_sums(grad_grid) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def exact_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with F.linear's signature, computed by ExactLinear (inputs of any leading shape)."""
    if input.dim() == 2:
        return ExactLinear.apply(input, weight, bias)
    y = ExactLinear.apply(input.reshape(-1, input.shape[-1]), weight, bias)
    return y.view(*input.shape[:-1], y.shape[-1])


# Whether the kernels registered by use_exact_products compute exactly, or as torch does.
_exact = False
_library: torch.library.Library | None = None


def use_exact_products(enabled: bool = True) -> None:
    """From now on, compute every float32 matrix product of this process exactly (or, with
    enabled=False, as torch does). Stages call it once, before any product."""
    global _exact, _library
    if enabled and _library is None:
        _library = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            # torch says that these replace its own kernels, which is what they are for.
            warnings.filterwarnings("ignore", "Overriding a previously registered kernel", UserWarning)
            for device in ("CPU", "CUDA"):
                _library.impl("linear", _linear, f"Autograd{device}")
                for name, exact_kernel in EXACT_KERNELS.items():
                    _library.impl(name, _switched(name, exact_kernel), device)
    _exact = enabled


def exact_products_used() -> bool:
    """Whether use_exact_products is on."""
    return _exact


@contextmanager
def exact_products_paused() -> Iterator[None]:
    """torch's own products inside the block, for a model that puts its operands on grids itself
    (shipped.py): the kernels here would round them again, to grids of whole tensors."""
    global _exact
    was, _exact = _exact, False
    try:
        yield
    finally:
        _exact = was


def _computes_exactly(*args) -> bool:
    """Whether a kernel computes exactly: while use_exact_products is on, for float32 operands, and not for
    torch.export or torch.compile, which trace torch's own operations (the program runs ours)."""
    floats = all(t.dtype == torch.float32 for t in args if isinstance(t, torch.Tensor))
    return _exact and floats and not torch.compiler.is_compiling()


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if _computes_exactly(input, weight):
        return exact_linear(input, weight, bias)
    return torch.ops.aten.linear.default.decompose(input, weight, bias)  # torch's own linear


def _switched(name: str, exact_kernel):
    """The kernel registered for the product `name`: `exact_kernel` for float32 while use_exact_products
    is on, else torch's own, reached through the op's out= variant (which stays torch's)."""
    in_place = name.endswith("_")
    native = getattr(torch.ops.aten, name.rstrip("_")).out

    def kernel(*args, **kwargs):
        if _computes_exactly(*args):
            result = exact_kernel(*args, **kwargs)
            return args[0].copy_(result) if in_place else result
        return native(*args, **kwargs, out=args[0] if in_place else args[0].new_empty(0))

    return kernel


def _scaled_sum(product: torch.Tensor, input: torch.Tensor, beta: complex, alpha: complex) -> torch.Tensor:
    """beta * input + alpha * product, as addmm and its kin define it: `input` is ignored where beta is 0."""
    if alpha != 1:
        product = product.mul_(alpha)
    if beta == 0:
        return product
    return product.add_(input if beta == 1 else input * beta)


def _addmm(input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    return _scaled_sum(exact_matmul(mat1, mat2), input, beta, alpha)


def _addmm_activation(input, mat1, mat2, *, beta=1, alpha=1, use_gelu=False) -> torch.Tensor:
    result = _addmm(input, mat1, mat2, beta=beta, alpha=alpha)
    return F.gelu(result, approximate="tanh") if use_gelu else result.relu_()


def _baddbmm(input: torch.Tensor, batch1: torch.Tensor, batch2: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    return _scaled_sum(exact_matmul(batch1, batch2), input, beta, alpha)


def _addbmm(input: torch.Tensor, batch1: torch.Tensor, batch2: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    # The sum of the batch's products is one product over all their terms: [M, B*K] @ [B*K, N].
    rows, columns = batch1.shape[1], batch2.shape[2]
    product = exact_matmul(batch1.transpose(0, 1).reshape(rows, -1), batch2.reshape(-1, columns))
    return _scaled_sum(product, input, beta, alpha)


def _addmv(input: torch.Tensor, mat: torch.Tensor, vec: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    return _scaled_sum(exact_matmul(mat, vec[:, None])[:, 0], input, beta, alpha)


# Every op of torch's that multiplies matrices, vectors or batches of them (matmul, einsum,
# tensordot and the like come down to these), with its exact float32 version.
EXACT_KERNELS = {
    "mm": exact_matmul,
    "bmm": exact_matmul,
    "addmm": _addmm,
    "addmm_": _addmm,
    "_addmm_activation": _addmm_activation,
    "baddbmm": _baddbmm,
    "baddbmm_": _baddbmm,
    "addbmm": _addbmm,
    "addbmm_": _addbmm,
    "mv": lambda mat, vec: exact_matmul(mat, vec[:, None])[:, 0],
    "addmv": _addmv,
    "addmv_": _addmv,
    "dot": lambda a, b: exact_matmul(a[None], b[:, None]).view(()),
    "vdot": lambda a, b: exact_matmul(a[None], b[:, None]).view(()),
}


def check_portable_kernels() -> None:
    """Refuse to compute portably where ATen runs other kernels than its AVX2 ones (see numerics.py)."""
    if not X86_64:
        return
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        if torch.cpu.get_capabilities().get("avx2"):
            settings = ", ".join(f"{name}={value}" for name, value in KERNELS.items())
            reason = f"torch picked its kernels before {settings} was set"
        else:
            reason = "this CPU has no AVX2"
        raise PipelineError(
            f"params.yaml: train.arithmetic is portable, which needs ATen's AVX2 kernels, but {reason} "
            f"(capability {capability}); set train.arithmetic: native"
        )
