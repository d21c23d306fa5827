import itertools

import pytest
import yaml
from conftest import NO_AUGMENTATION, PROJECT

from mnist_pipeline.params import AugmentParams, ModelParams, TrainParams, load_params
from mnist_pipeline.stage import PipelineError

VALID = """
model:
  hidden_sizes: [8, 4]
train:
  optimizer: sgd
  lr: 0.1
  momentum: 0
  weight_decay: 0
  label_smoothing: 0
  schedule: constant
  batch_size: 16
  epochs: 2
  seed: 0
  device: cpu
  precision: fp32
  arithmetic: portable
  num_threads: 0
  nproc: 1
  nnodes: 1
augment:
  rotation: 10
  scale: 0.1
  shear: 5.5
  translation: 2
  elastic_alpha: 30
  elastic_sigma: 5
"""


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_the_project_defaults_are_the_tutorial_setup():
    assert load_params(PROJECT / "params.yaml", "model", ModelParams) == ModelParams([520, 320, 240, 120])
    assert load_params(PROJECT / "params.yaml", "train", TrainParams) == TrainParams(
        optimizer="sgd",
        lr=0.01,
        momentum=0.5,
        weight_decay=0.0,
        label_smoothing=0.0,
        schedule="constant",
        batch_size=64,
        epochs=9,
        seed=1,
        device="auto",
        precision="fp32",
        arithmetic="portable",
        num_threads=0,
        nproc=1,
        nnodes=1,
    )


def test_valid_params_load_as_typed_settings(tmp_path):
    path = write(tmp_path, VALID)
    assert load_params(path, "model", ModelParams).hidden_sizes == [8, 4]
    assert load_params(path, "train", TrainParams).device == "cpu"
    assert load_params(path, "augment", AugmentParams).shear == 5.5


def test_the_project_default_is_no_augmentation():
    assert load_params(PROJECT / "params.yaml", "augment", AugmentParams) == NO_AUGMENTATION


# For each section: (the old text of VALID, what replaces it, what the error must say).
BAD = {
    "train": [
        ("lr: 0.1", "lr: -1", "train.lr must be a positive finite number, got -1"),
        ("lr: 0.1", "lr: fast", "train.lr must be a positive finite number, got 'fast'"),
        ("lr: 0.1", "lr: .inf", "train.lr must be a positive finite number, got inf"),
        ("lr: 0.1", "lr: .nan", "train.lr must be a positive finite number, got nan"),
        ("momentum: 0", "momentum: .nan", r"train.momentum must be a number in \[0, 1\), got nan"),
        ("momentum: 0", "momentum: 1", r"train.momentum must be a number in \[0, 1\), got 1"),
        ("batch_size: 16", "batch_size: 16.5", "train.batch_size must be a positive integer, got 16.5"),
        ("epochs: 2", "epochs: 0", "train.epochs must be a positive integer, got 0"),
        ("epochs: 2", "epochs: true", "train.epochs must be a positive integer, got True"),
        ("seed: 0", "seed: -3", "train.seed must be an integer from 0 to 18446744073709551615, got -3"),
        ("seed: 0", "seed: 99999999999999999999", "train.seed must be an integer from 0 to 18446744073709551615"),
        ("device: cpu", "device: gpu", "train.device must be one of auto, cpu, cuda, cuda:N, mps, got 'gpu'"),
        ("device: cpu", "device: 'cuda:x'", "train.device must be one of .*, got 'cuda:x'"),
        ("seed: 0", "sed: 0", "unknown parameter train.sed"),
        ("optimizer: sgd", "optimizer: adam", "train.optimizer must be sgd or adamw, got 'adam'"),
        ("schedule: constant", "schedule: cosine", "train.schedule must be constant or onecycle, got 'cosine'"),
        ("precision: fp32", "precision: fp16", "train.precision must be fp32 or bf16, got 'fp16'"),
        ("arithmetic: portable", "arithmetic: exact", "train.arithmetic must be portable or native, got 'exact'"),
        ("num_threads: 0", "num_threads: -1", r"train.num_threads must be an integer from 0 \(all cores\) to \d+"),
        ("num_threads: 0", "num_threads: 100000", r"to \d+ \(this machine's cores\), got 100000"),
        ("nproc: 1", "nproc: 0", r"train.nproc must be a positive integer, got 0"),
        ("nnodes: 1", "nnodes: 1.5", r"train.nnodes must be a positive integer, got 1.5"),
        ("weight_decay: 0", "weight_decay: -0.1", "train.weight_decay must be a non-negative finite number, got -0.1"),
        ("weight_decay: 0", "weight_decay: .inf", "train.weight_decay must be a non-negative finite number, got inf"),
        ("label_smoothing: 0", "label_smoothing: 1", r"train.label_smoothing must be a number in \[0, 1\), got 1"),
        ("  seed: 0\n", "", "missing parameter train.seed"),
    ],
    "augment": [
        ("rotation: 10", "rotation: -5", "augment.rotation must be a number of degrees from 0 to 180, got -5"),
        ("rotation: 10", "rotation: 181", "augment.rotation must be a number of degrees from 0 to 180, got 181"),
        ("rotation: 10", "rotation: .nan", "augment.rotation must be a number of degrees from 0 to 180, got nan"),
        ("scale: 0.1", "scale: 1", r"augment.scale must be a number in \[0, 1\), got 1"),
        ("scale: 0.1", "scale: -0.1", r"augment.scale must be a number in \[0, 1\), got -0.1"),
        ("shear: 5.5", "shear: 90", r"augment.shear must be a number of degrees in \[0, 90\), got 90"),
        ("translation: 2", "translation: .inf", "augment.translation must be a non-negative finite number of pixels"),
        ("translation: 2", "translation: two", "augment.translation must be .*, got 'two'"),
        ("elastic_alpha: 30", "elastic_alpha: -1", "augment.elastic_alpha must be a non-negative finite number"),
        ("elastic_sigma: 5", "elastic_sigma: .nan", "augment.elastic_sigma must be a non-negative finite number"),
        ("elastic_sigma: 5", "elastic_sigma: 0", "augment.elastic_alpha above 0 needs augment.elastic_sigma above 0"),
        ("  shear: 5.5\n", "", "missing parameter augment.shear"),
        ("shear: 5.5", "sheer: 5.5", "unknown parameter augment.sheer"),
    ],
}
SECTIONS = {"train": TrainParams, "augment": AugmentParams}


@pytest.mark.parametrize(
    ("section", "old", "new", "message"), [(section, *case) for section, cases in BAD.items() for case in cases]
)
def test_bad_params_name_the_parameter_and_what_was_expected(tmp_path, section, old, new, message):
    path = write(tmp_path, VALID.replace(old, new))
    with pytest.raises(PipelineError, match=message) as error:
        load_params(path, section, SECTIONS[section])
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("written", "value"), [("1e-3", 0.001), ("2E+2", 200.0), ("-1e3", -1000.0), ("1.5e-3", 0.0015)]
)
def test_numbers_in_exponent_notation_are_numbers_as_dvc_reads_them(tmp_path, written, value):
    # `dvc exp run -S train.lr=0.001` writes `lr: 1e-3`, a string to YAML 1.1 (PyYAML's default).
    path = write(tmp_path, VALID.replace("weight_decay: 0", f"weight_decay: {written}"))
    if value < 0:
        with pytest.raises(PipelineError, match=f"weight_decay must be a non-negative finite number, got {value}"):
            load_params(path, "train", TrainParams)
    else:
        assert load_params(path, "train", TrainParams).weight_decay == value


def test_bad_hidden_sizes(tmp_path):
    path = write(tmp_path, VALID.replace("[8, 4]", "[8, 0]"))
    with pytest.raises(PipelineError, match=r"model.hidden_sizes must be a list of positive integers, got \[8, 0\]"):
        load_params(path, "model", ModelParams)


def test_missing_section_and_broken_yaml(tmp_path):
    with pytest.raises(PipelineError, match="missing section 'model'"):
        load_params(write(tmp_path, "train: {}\n"), "model", ModelParams)
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_params(write(tmp_path, "train: [unclosed\n"), "train", TrainParams)
    with pytest.raises(PipelineError, match="cannot read"):
        load_params(tmp_path / "absent.yaml", "train", TrainParams)


@pytest.mark.parametrize(("name", "runs"), [("fast", 1), ("medium", 1), ("best", 1), ("sweep", 4)])
def test_recipes_are_valid_overrides_of_params_yaml(tmp_path, name, runs):
    """Each line of recipes/<name>.txt is a `dvc exp run -S` override of an existing parameter; a
    comma-separated value makes a grid, and every point of it is valid."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    choices = {}
    for line in (PROJECT / "recipes" / f"{name}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            section, field = key.split(".")
            assert field in params[section], key
            choices[(section, field)] = [yaml.safe_load(v) for v in value.split(",")]
    grid = list(itertools.product(*choices.values()))
    assert len(grid) == runs
    for point in grid:
        for (section, field), value in zip(choices, point, strict=True):
            params[section][field] = value
        path = write(tmp_path, yaml.safe_dump(params))
        assert load_params(path, "train", TrainParams).optimizer == "adamw"
        load_params(path, "augment", AugmentParams)
