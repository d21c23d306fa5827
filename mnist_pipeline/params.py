"""Reading params.yaml into checked, typed settings; every mistake names the parameter."""

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from mnist_pipeline.cores import machine_cores
from mnist_pipeline.stage import PipelineError

MAX_SEED = 2**64 - 1  # torch.manual_seed takes 64 bits


@dataclass(frozen=True)
class ModelParams:
    hidden_sizes: list[int]


@dataclass(frozen=True)
class TrainParams:
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    label_smoothing: float
    schedule: str
    batch_size: int
    epochs: int
    seed: int
    device: str
    precision: str
    arithmetic: str
    num_threads: int
    nproc: int
    nnodes: int

    def determining(self) -> dict[str, Any]:
        """The params that decide the trained weights' bits, which the checkpoint and the model card record:
        all of them but, in the portable arithmetic, RUN_SETTINGS."""
        values = asdict(self)
        return {k: v for k, v in values.items() if self.arithmetic != "portable" or k not in RUN_SETTINGS}


# How a training is spread over the machine's threads, processes and machines: in the portable arithmetic
# they change no bit of the result (docs/scaling.md). They stay params, which DVC hashes, for the native one.
RUN_SETTINGS = ("num_threads", "nproc", "nnodes")


@dataclass(frozen=True)
class AugmentParams:
    rotation: float  # degrees
    scale: float
    shear: float  # degrees
    translation: float  # pixels
    elastic_alpha: float  # pixels
    elastic_sigma: float  # pixels


# For each parameter: a test of its value and what the error says was expected.
CHECKS = {
    "model.hidden_sizes": (
        lambda v: isinstance(v, list) and all(_is_int(n) and n > 0 for n in v),
        "a list of positive integers",
    ),
    "train.optimizer": (lambda v: v in ("sgd", "adamw"), "sgd or adamw"),
    "train.lr": (lambda v: _is_number(v) and 0 < v < math.inf, "a positive finite number"),
    "train.weight_decay": (lambda v: _is_number(v) and 0 <= v < math.inf, "a non-negative finite number"),
    "train.label_smoothing": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "train.schedule": (lambda v: v in ("constant", "onecycle"), "constant or onecycle"),
    "train.precision": (lambda v: v in ("fp32", "bf16"), "fp32 or bf16"),
    "train.arithmetic": (lambda v: v in ("portable", "native"), "portable or native"),
    "train.num_threads": (
        lambda v: _is_int(v) and 0 <= v <= machine_cores(),
        f"an integer from 0 (all cores) to {machine_cores()} (this machine's cores)",
    ),
    "train.nproc": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "train.nnodes": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "train.momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "train.batch_size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "train.epochs": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "train.seed": (lambda v: _is_int(v) and 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}"),
    "train.device": (
        lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
        "one of auto, cpu, cuda, cuda:N, mps",
    ),
    "augment.rotation": (lambda v: _is_number(v) and 0 <= v <= 180, "a number of degrees from 0 to 180"),
    "augment.scale": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "augment.shear": (lambda v: _is_number(v) and 0 <= v < 90, "a number of degrees in [0, 90)"),
    "augment.translation": (lambda v: _is_number(v) and 0 <= v < math.inf, "a non-negative finite number of pixels"),
    "augment.elastic_alpha": (lambda v: _is_number(v) and 0 <= v < math.inf, "a non-negative finite number of pixels"),
    "augment.elastic_sigma": (lambda v: _is_number(v) and 0 <= v < math.inf, "a non-negative finite number of pixels"),
}
# Checks of two parameters together, by section: (test of the section's values, what the error says).
JOINT_CHECKS = {
    "augment": [
        (
            lambda v: v["elastic_alpha"] == 0 or v["elastic_sigma"] > 0,
            "augment.elastic_alpha above 0 needs augment.elastic_sigma above 0 (unsmoothed noise is no distortion)",
        )
    ],
}


class ParamsLoader(yaml.SafeLoader):
    """YAML as DVC reads params.yaml (YAML 1.2): `1e-3` is a number, where YAML 1.1 reads a string.

    `dvc exp run -S train.lr=0.001` writes `lr: 1e-3`; train.lr must then be what DVC shows.
    """


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$"), list("-+.0123456789")
)


def load_params(path: Path, section: str, cls: type) -> Any:
    """The checked `section` of the params file at `path`, as an instance of the dataclass `cls`."""
    try:
        params = yaml.load(path.read_text(), ParamsLoader)
    except OSError as error:
        raise PipelineError(f"{path}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise PipelineError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    values = (params or {}).get(section)
    if not isinstance(values, dict):
        raise PipelineError(f"{path}: missing section '{section}'")
    names = {field.name for field in fields(cls)}
    for key in values.keys() - names:
        raise PipelineError(f"{path}: unknown parameter {section}.{key} (expected {', '.join(sorted(names))})")
    for key in names:
        name = f"{section}.{key}"
        if key not in values:
            raise PipelineError(f"{path}: missing parameter {name}")
        check, expected = CHECKS[name]
        if not check(values[key]):
            raise PipelineError(f"{path}: {name} must be {expected}, got {values[key]!r}")
    for check, message in JOINT_CHECKS.get(section, []):
        if not check(values):
            raise PipelineError(f"{path}: {message}")
    return cls(**{key: values[key] for key in names})


def read_recipe(path: Path) -> dict[str, Any]:
    """A recipe of recipes/: its `<section>.<key>=<value>` lines (not its # comments) as
    {"<section>.<key>": value}, each value read as YAML, as `dvc exp run -S` reads it."""
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {key: yaml.safe_load(value) for key, value in (line.split("=", 1) for line in lines)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
