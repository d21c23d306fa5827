"""The exported files: what they take and return, that they carry their arithmetic (the same logits in
any batch and on any machine, for a user with torch alone), and that the export ships nothing else."""

import io
import math
import zipfile

import pytest
import torch
from conftest import PROJECT, consume, export_files, idx_bytes, synthetic_split

from mnist_pipeline.data import scale_pixels
from mnist_pipeline.export import DigitClassifier, export_torchscript, torchscript_bytes
from mnist_pipeline.model import MLP
from mnist_pipeline.shipped import ShippedMLP, logits_sha256, softmax
from mnist_pipeline.stage import PipelineError
from mnist_pipeline.torchscript import load_torchscript


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MLP([520, 320, 240, 120]).eval()


@pytest.fixture(scope="module")
def shipped(model):
    return ShippedMLP(model)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    """model.pt and model.pt2 as the export stage writes them, and a plain float32 TorchScript and
    torch.export of the same weights beside them: the negative control of the checks below."""
    directory = tmp_path_factory.mktemp("export")
    images = torch.from_numpy(synthetic_split(50, seed=2)[0])
    export_files(model, directory, images)
    torch.jit.save(
        torch.jit.script(DigitClassifier(model)), directory / "plain.pt"
    )  # the input checks, torch's arithmetic
    program = torch.export.export(model, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("n")},))
    torch.export.save(program, directory / "plain.pt2")
    return directory


@pytest.fixture(scope="module")
def scripted(files):
    return load_torchscript(files / "model.pt")


def test_exported_module_gives_the_shipped_models_logits(shipped, scripted):
    images = torch.rand(100, 1, 28, 28)
    assert torch.equal(scripted(images), shipped(images))


def test_every_accepted_input_form_gives_the_same_logits(shipped, scripted):
    pixels = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    expected = shipped(scale_pixels(pixels))
    for images in (pixels, pixels.unsqueeze(1), pixels.float() / 255, pixels.float().unsqueeze(1) / 255):
        logits = scripted(images)
        assert logits.shape == (3, 10) and logits.dtype == torch.float32
        assert torch.equal(logits, expected)


def test_probabilities_are_the_portable_softmax_of_the_logits(scripted):
    images = torch.rand(5, 28, 28)
    probabilities = scripted.probabilities(images)
    assert torch.equal(probabilities, softmax(scripted(images)))
    assert torch.allclose(probabilities, torch.softmax(scripted(images), 1))


@pytest.mark.parametrize("n", [1, 10_000])
def test_batch_sizes_from_one_to_ten_thousand(scripted, n):
    assert scripted(torch.rand(n, 1, 28, 28)).shape == (n, 10)
    assert scripted.probabilities(torch.zeros(n, 28, 28, dtype=torch.uint8)).shape == (n, 10)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(2, 784), r"expected images of shape \[N, 28, 28\] or \[N, 1, 28, 28\], got \[2, 784\]"),
        (torch.rand(2, 3, 28, 28), r"expected images of shape .*, got \[2, 3, 28, 28\]"),
        (torch.rand(28, 28), r"expected images of shape .*, got \[28, 28\]"),
        (torch.rand(2, 28, 28, dtype=torch.float64), r"expected float32 pixels in \[0, 1\] or uint8 pixels in 0..255"),
        (torch.randint(0, 9, (2, 28, 28)), r"expected float32 pixels in \[0, 1\] or uint8"),
        (torch.rand(2, 28, 28) * 255, r"float32 pixels must be in \[0, 1\], and numbers \(pass uint8 for 0..255"),
        (torch.full((2, 28, 28), math.nan), r"float32 pixels must be in \[0, 1\], and numbers"),
        (torch.rand(2, 32, 32), r"expected images of shape .*, got \[2, 32, 32\]"),
    ],
)
def test_wrong_inputs_say_what_was_expected(scripted, images, message):
    with pytest.raises(torch.jit.Error, match=message):
        scripted(images)


def test_saved_bytes_carry_no_source_paths(shipped):
    """(That they do not change with the hash seed of the process that writes them: test_pipeline.py.)"""
    first = torchscript_bytes(shipped)
    assert str(PROJECT).encode() not in first
    names = zipfile.ZipFile(io.BytesIO(first)).namelist()
    assert not any(name.endswith(".debug_pkl") for name in names)
    assert all(name.startswith("archive/") for name in names)


def test_torch_export_program_has_a_dynamic_batch_and_stable_bytes(model, shipped, files, tmp_path):
    program = torch.export.load(files / "model.pt2").module()
    for n in (1, 7, 10_000):
        batch = torch.rand(n, 1, 28, 28)
        assert torch.equal(program(batch), shipped(batch))
    content = (files / "model.pt2").read_bytes()
    assert str(PROJECT).encode() not in content
    export_files(model, tmp_path, torch.from_numpy(synthetic_split(50, seed=2)[0]))
    assert (tmp_path / "model.pt2").read_bytes() == content


def test_a_file_that_does_not_give_evaluates_logits_is_not_kept(shipped, tmp_path):
    """One image's logits off by a bit: the file is removed, and the error says how many images differ."""
    images = torch.from_numpy(synthetic_split(20, seed=3)[0])
    expected = shipped(scale_pixels(images)).detach()
    expected.view(torch.int32)[7, 3] += 1
    with pytest.raises(PipelineError, match=r"model.pt: its logits differ from evaluate's on 1 of 20 test images"):
        export_torchscript(shipped, tmp_path / "model.pt", images, expected)
    assert list(tmp_path.iterdir()) == []


# The operations the exported graphs may hold, by the reason their bits do not depend on the kernel that
# computes them (so on the CPU, its instruction set or the thread count). An operation not listed fails
# the test below: find out what computes it before adding it.
KERNEL_INDEPENDENT = {
    "move or make data, or compute on integers and shapes": (
        "Bool Int __derive_index __getitem__ __is__ __isnot__ __range_length dim dtype flatten format getitem len "
        "list ones_like select size slice str unsqueeze view"
    ),
    "exact: a comparison, a maximum, a magnitude, a clamp, a split into mantissa and exponent, a rectifier": (
        "abs amax clamp eq frexp ge gt le lt max min ne relu"
    ),
    "one correctly rounded IEEE 754 operation per element": "add div div_ mul sub to",
    "a product of operands on their grids (shipped.GridLinear): exact in float32 whatever computes it": "matmul mm",
}
ALLOWED = {name for names in KERNEL_INDEPENDENT.values() for name in names.split()}


def operations(path) -> set[str]:
    """The names of the ATen and Python operations in a saved model's graphs: every TorchScript method
    (inlined), or the torch.export program's calls."""
    if path.suffix == ".pt2":
        nodes = torch.export.load(path).graph_module.graph.nodes
        return {node.target.__name__.split(".")[0] for node in nodes if node.op == "call_function"}
    module = load_torchscript(path)
    graphs = [getattr(module, name).graph for name in ("forward", "probabilities", "pixels") if hasattr(module, name)]
    for graph in graphs:
        torch._C._jit_pass_inline(graph)
    return {node.kind().split("::")[1] for graph in graphs for node in graph.nodes() if node.kind().startswith("aten")}


@pytest.mark.parametrize("name", ["model.pt", "model.pt2"])
def test_the_files_hold_only_operations_whose_bits_do_not_depend_on_the_kernel(files, name):
    """And the negative control: the plain float32 export of the same weights holds torch's own linear."""
    assert operations(files / name) <= ALLOWED, sorted(operations(files / name) - ALLOWED)
    assert "linear" in operations(files / f"plain{name.removeprefix('model')}") - ALLOWED


@pytest.fixture(scope="module")
def test_set(shipped, tmp_path_factory):
    """250 synthetic digits as IDX files, a third of them faint, and the shipped model's logits on them."""
    directory = tmp_path_factory.mktemp("idx")
    images, labels = synthetic_split(250, seed=4)
    images[::3] = images[::3] // 6
    (directory / "images").write_bytes(idx_bytes(images))
    (directory / "labels").write_bytes(idx_bytes(labels))
    logits = shipped(scale_pixels(torch.from_numpy(images))).detach()
    accuracy = (logits.argmax(1) == torch.from_numpy(labels.astype("int64"))).sum().item() / len(labels)
    return directory / "images", directory / "labels", logits_sha256(logits), accuracy


def test_a_user_with_torch_alone_gets_the_same_logits_in_any_batch(files, test_set):
    """model.pt and model.pt2 in a fresh Python that knows nothing of the project: whole, in hundreds,
    in sevens and one image at a time, the logits of evaluate (the shipped model in this process) bit
    for bit; and the plain float32 TorchScript of the same weights, in one batch, does not give them.
    (With what differs between machines changed: tests/test_real_mnist.py, on the real test set.)"""
    images, labels, expected, accuracy = test_set
    names = ["model.pt", "model.pt2", "plain.pt"]
    arguments = [f"{files / name}@0" if name == "plain.pt" else str(files / name) for name in names]  # control: 1 batch
    results = consume("as installed", images, labels, arguments, batches="0,100,7,1")
    for name in names:
        logits = {batch: result for batch, result in results[str(files / name)].items() if batch != "probabilities"}
        if name.startswith("model"):
            assert all(result == {"accuracy": accuracy, "sha256": expected} for result in logits.values()), name
        else:
            assert all(result["sha256"] != expected for result in logits.values()), name
