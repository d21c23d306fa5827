import io
import re

import pytest
import torch

from mnist_pipeline.model import MLP, MNIST_MEAN, MNIST_STD, hidden_sizes, load_checkpoint, save_checkpoint
from mnist_pipeline.stage import PipelineError


def test_default_architecture_is_784_520_320_240_120_10():
    model = MLP([520, 320, 240, 120])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 520),
        (520, 320),
        (320, 240),
        (240, 120),
        (120, 10),
    ]
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.modules()) == 4


@pytest.mark.parametrize("shape", [(1, 1, 28, 28), (5, 1, 28, 28), (5, 784)])
def test_images_in_either_layout_give_ten_logits(shape):
    assert MLP([16]).eval()(torch.rand(shape)).shape == (shape[0], 10)


def test_inputs_are_normalized_with_the_mnist_statistics():
    model = MLP([]).eval()  # a single Linear layer: logits = W @ normalized + b
    with torch.no_grad():
        model.layers[0].weight.fill_(1.0)
        model.layers[0].bias.zero_()
    pixels = torch.full((1, 784), MNIST_MEAN + MNIST_STD)  # one standard deviation above the mean
    assert torch.allclose(model(pixels), torch.full((1, 10), 784.0))


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = MLP([32, 16])
    save_checkpoint(model, {"lr": 0.1, "epochs": 3}, tmp_path / "checkpoint.pt")
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert hidden_sizes(checkpoint.model) == [32, 16]
    assert checkpoint.train_params == {"lr": 0.1, "epochs": 3}
    loaded = checkpoint.model
    assert not loaded.training
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary files left


def saved(content: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


def checkpoint_bytes(model: MLP, hidden: list[int]) -> bytes:
    return saved({"hidden_sizes": hidden, "train_params": {}, "state_dict": model.state_dict()})


def diverged_model() -> MLP:
    model = MLP([8])
    with torch.no_grad():
        model.layers[0].weight[0, 0] = float("nan")
    return model


GOOD = checkpoint_bytes(MLP([8]), [8])


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (GOOD[: len(GOOD) // 2], r"damaged or not a checkpoint \(torch.load raised \w+\)"),
        (bytes(range(256)) * 8, r"damaged or not a checkpoint \(torch.load raised \w+\)"),
        (b"text, not a checkpoint\n", r"damaged or not a checkpoint \(torch.load raised \w+\)"),
        # A pickle that would run a shell command if loaded unsafely.
        (b"cos\nsystem\n(S'echo unsafe'\ntR.", r"damaged or not a checkpoint \(torch.load raised \w+\)"),
        (saved(torch.zeros(3)), r"not a checkpoint of the train stage \(expected a dict of hidden_sizes"),
        (saved({"weights": 1}), r"not a checkpoint of the train stage \(expected a dict of hidden_sizes"),
        (checkpoint_bytes(MLP([9]), [8]), r"its weights do not fit the multilayer perceptron with hidden sizes \[8\]"),
        (checkpoint_bytes(MLP([8]), [10**12]), "its weights do not fit .* hidden sizes \\[1000000000000\\]"),
        (checkpoint_bytes(MLP([8]), "8"), "hidden_sizes must be a list of positive integers, got '8'"),
        (checkpoint_bytes(diverged_model(), [8]), "its weights hold NaN or infinite values"),
    ],
    ids=["empty", "truncated", "binary", "text", "code", "tensor", "dict", "mismatch", "huge", "sizes", "nan"],
)
def test_a_damaged_or_foreign_checkpoint_is_one_line_naming_the_file_and_the_stage(tmp_path, content, reason):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(PipelineError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert re.fullmatch(rf"{re.escape(str(path))}: {reason}.*; the train stage rewrites it: dvc repro train", message)
    assert "\n" not in message
    assert "weights_only" not in message  # torch's advice to load unsafely is not passed on


def test_a_missing_checkpoint_names_the_stage_that_writes_it(tmp_path):
    with pytest.raises(PipelineError, match=r"absent.pt: file not found; the train stage rewrites it: dvc repro train"):
        load_checkpoint(tmp_path / "absent.pt")
