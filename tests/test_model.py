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


def test_a_foreign_or_missing_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="other.pt: not a checkpoint written by the train stage"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"weights": 1}, tmp_path / "dict.pt")
    with pytest.raises(PipelineError, match="dict.pt: not a checkpoint written by the train stage"):
        load_checkpoint(tmp_path / "dict.pt")
    with pytest.raises(PipelineError, match=r"absent.pt: file not found \(run the train stage"):
        load_checkpoint(tmp_path / "absent.pt")
