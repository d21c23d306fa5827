"""Hashes of the pipeline's arithmetic on this machine: two CPUs compared in a minute, without a training.

    uv run python -m mnist_pipeline.fingerprint        (or: make fingerprint)

Each line hashes one part of the arithmetic, run as the stages run it (ATen pinned, exact products
on), on data and initial weights built from integers, so the same on every machine: the
elementary functions, the exact products, augmentation's deformed digits, short trainings
with every deformation on and the per-epoch test passes (SGD, and AdamW with the one-cycle
schedule), and the model as it ships (its logits and probabilities, whole and image by image).
Two machines that print the same "portable" lines compute the pipeline's bytes alike. The
"native" lines show what the portable arithmetic is for: torch's own functions and products,
whose bits differ between CPUs (and thread counts). docs/reproducibility.md lists the values of
every CPU measured so far.
"""

# The stages' numeric settings come before torch loads (see numerics.py).
from mnist_pipeline.numerics import describe_cpu, pin_kernels

pin_kernels()

import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
from contextlib import redirect_stderr, redirect_stdout  # noqa: E402

import torch  # noqa: E402

from mnist_pipeline.augment import Augmentation  # noqa: E402
from mnist_pipeline.elementary import exp, sin_cos, tan  # noqa: E402
from mnist_pipeline.exact import ExactLinear  # noqa: E402
from mnist_pipeline.model import MLP  # noqa: E402
from mnist_pipeline.params import AugmentParams, TrainParams  # noqa: E402
from mnist_pipeline.shipped import ShippedMLP, evaluate_shipped, softmax  # noqa: E402
from mnist_pipeline.stage import counted  # noqa: E402
from mnist_pipeline.training import configure_device, train  # noqa: E402

EVERY_DEFORMATION = AugmentParams(
    rotation=15.0, scale=0.15, shear=10.0, translation=2.0, elastic_alpha=34.0, elastic_sigma=5.0
)
SGD = TrainParams(
    optimizer="sgd",
    lr=0.01,
    momentum=0.5,
    weight_decay=0.0,
    label_smoothing=0.0,
    schedule="constant",
    batch_size=64,
    epochs=2,
    seed=1,
    device="cpu",
    precision="fp32",
    arithmetic="portable",
    num_threads=0,
    nproc=1,
    nnodes=1,
)
ADAMW = dataclasses.replace(
    SGD, optimizer="adamw", lr=0.003, weight_decay=0.05, label_smoothing=0.1, schedule="onecycle", batch_size=256
)


def digest(*tensors: torch.Tensor) -> str:
    """The first 16 hex digits of the sha256 of the tensors' bytes."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def synthetic_digits(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [count, 784] images and their labels, from integers: each class lights up its own patch."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = torch.randint(0, 60, (count, 28, 28), generator=generator, dtype=torch.uint8)
    for digit in range(10):
        row, column = divmod(digit, 5)
        images[labels == digit, 2 + 12 * row : 8 + 12 * row, 2 + 5 * column : 8 + 5 * column] = 255
    return images.view(count, -1), labels


def trained(params: TrainParams) -> str:
    """The hash of the weights and the per-epoch figures of a short training with every deformation."""
    images, labels = synthetic_digits(4096, seed=1)
    test_images, test_labels = synthetic_digits(1000, seed=2)
    torch.manual_seed(params.seed)
    model = MLP([520, 320, 240, 120])
    rows = []

    def report(row: dict) -> None:
        test = evaluate_shipped(model, test_images, test_labels)
        rows.extend([row["train/loss"], row["train/accuracy"], row["lr"], test.loss, test.accuracy])

    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # its progress
        train(model, images, labels, params, EVERY_DEFORMATION, report)
    return digest(*model.state_dict().values(), torch.tensor(rows, dtype=torch.float64))


def shipped() -> str:
    """The hash of the shipped model's logits and probabilities on 1000 images, in one batch and one by one
    (the same bits, or another hash)."""
    images, _ = synthetic_digits(1000, seed=4)
    torch.manual_seed(4)
    model = ShippedMLP(MLP([520, 320, 240, 120]))
    pixels = images.float() / 255
    with torch.no_grad():
        whole = model(pixels)
        one_by_one = torch.cat([model(pixels[i : i + 1]) for i in range(len(pixels))])
    return digest(whole, one_by_one, softmax(whole))


def main() -> None:
    configure_device(SGD, torch.device("cpu"))  # threads and memory as the train stage sets them
    threads = counted(torch.get_num_threads(), "thread")  # the trainings may run fewer (see cores.FreeCores)
    values = torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 6 - 3
    generator = torch.Generator().manual_seed(3)
    shapes = [(64, 784), (520, 784), (520,), (64, 520)]
    x, weight, bias, grad_y = (torch.randint(-(2**20), 2**20, s, generator=generator) / 2**20 for s in shapes)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    y = ExactLinear.apply(*leaves)
    y.backward(grad_y)
    images, _ = synthetic_digits(256, seed=3)
    augmentation = Augmentation(EVERY_DEFORMATION, seed=1, device=torch.device("cpu"))
    deformed = [augmentation(images.float() / 255) for _ in range(3)]
    lines = {
        "portable elementary functions (sin, cos, tan, exp)": digest(*sin_cos(values), tan(values / 2), exp(values)),
        "portable exact products (a linear layer and its gradients)": digest(y, *(leaf.grad for leaf in leaves)),
        "portable augmentation (3 batches of 256, every deformation)": digest(*deformed),
        "portable training, SGD (2 epochs, augmented)": trained(SGD),
        "portable training, AdamW one-cycle (2 epochs, augmented)": trained(ADAMW),
        "portable shipped model (1000 images, whole and one by one)": shipped(),
        "native: torch's own sin, cos, tan, exp, log (MKL)": digest(
            *(f(values) for f in (torch.sin, torch.cos, torch.tan, torch.exp)), torch.log(values.abs() + 0.1)
        ),
        "native: training, SGD (torch's own products)": trained(dataclasses.replace(SGD, arithmetic="native")),
    }
    width = max(map(len, lines))
    for name, value in lines.items():
        print(f"{name:<{width}}  {value}")
    kernels = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {threads}, kernels {kernels}")
    print(describe_cpu())


if __name__ == "__main__":
    main()
