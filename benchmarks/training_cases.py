"""The train and evaluate stages on their own: recipes and arithmetics (`variants`), beside busy
processes (`busy`), a step's parts (`steps`), augmentation's share (`augment`) and the best recipe (`best`)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from cells import column, spread
from mnist_pipeline.params import read_recipe
from mnist_pipeline.training import cpu_has_native_bf16
from scratch import ROOT, Scratch

CASES = ["variants", "busy", "steps", "augment", "best"]
TRAIN_IMAGES = 60_000


def overrides(name: str) -> dict:
    """recipes/<name>.txt as {"<section>.<key>": value}."""
    return read_recipe(ROOT / "recipes" / f"{name}.txt")


RECIPES = {"default": {}, "fast": overrides("fast"), "medium": overrides("medium")}
NATIVE = {"train.arithmetic": "native"}
NO_AUGMENTATION = {key: 0 for key in overrides("best") if key.startswith("augment.")}
# A CPU with AVX2 alone, as near as this one comes to it: MKL's and oneDNN's kernels held to AVX2 (ATen's
# are in the portable arithmetic anyway). Variants named "..., AVX2-only" run with it.
AVX2_ONLY = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
EMULATED = [f"{name}, AVX2-only" for name in ("default", "fast")]
VARIANTS = {
    **RECIPES,
    **{f"{name}, native": params | NATIVE for name, params in RECIPES.items()},
    **{name: RECIPES[name.split(",")[0]] for name in EMULATED},
    **{f"{name.split(',')[0]}, native, AVX2-only": RECIPES[name.split(",")[0]] | NATIVE for name in EMULATED},
    "fast, bf16": RECIPES["fast"] | NATIVE | {"train.precision": "bf16"},  # where the CPU has native bf16
    "1-thread": {"train.num_threads": 1},
    "2 processes": {"train.nproc": 2},  # data-parallel through torchrun, a thread each
    "best, 3 epochs": overrides("best") | {"train.epochs": 3},
    "best, 3 epochs, no augmentation": overrides("best") | {"train.epochs": 3} | NO_AUGMENTATION,
}
BUSY = "while True: pass"
STEP_PARTS = ["products", "roundings", "conversions", "optimizer", "other operations", "rest", "profiled", "step"]


def import_seconds(importtime: str, module: str) -> float:
    """Cumulative time of `import <module>` from the stderr of `python -X importtime`."""
    for line in importtime.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) == 3 and fields[2].strip() == module:
            return int(fields[1]) / 1e6
    raise ValueError(f"no `import {module}` in the -X importtime output")


def run_variant(scratch: Scratch, name: str, changes: dict) -> dict:
    """The train and evaluate stages on their own, with params overridden by `changes`
    ({"<section>.<key>": value}), outputs under .bench/<name>/."""
    params = yaml.safe_load((scratch.path / "params.yaml").read_text())
    for key, value in changes.items():
        section, field = key.split(".")
        params[section][field] = value
    work = Path(".bench") / name
    (scratch.path / work).mkdir(exist_ok=True)
    (scratch.path / work / "params.yaml").write_text(yaml.safe_dump(params))
    checkpoint = str(work / "checkpoint.pt")
    run = scratch.run_with(AVX2_ONLY) if name.endswith("AVX2-only") else scratch.run
    train = run(
        *(sys.executable, "-X", "importtime", "-m", "stages.train", "--params", str(work / "params.yaml")),
        *("--data", "data/mnist", "--checkpoint", checkpoint, "--live", str(work / "live")),
        *("--augmented", str(work / "augmented.gif")),
    )
    evaluate = run(
        *(sys.executable, "-m", "stages.evaluate", "--data", "data/mnist", "--checkpoint", checkpoint),
        *("--metrics", str(work / "eval.json"), "--logits", str(work / "test_logits.bin")),
        *("--per-digit", str(work / "per_digit.csv")),
        *("--confusions", str(work / "confusions.csv"), "--mistakes", str(work / "mistakes.png")),
    )
    # The stage prints "training on ..." right before its first step.
    first_step = next(seconds for seconds, line in train.lines if line.startswith("training on"))
    return {
        "wall": train.wall + evaluate.wall,
        "train": train.number(r"^trained \d+ epochs?(?: on \d+ processes)? in ([\d.]+) s"),
        "startup": first_step - import_seconds(train.stderr, "torch"),
        "dvclive": import_seconds(train.stderr, "dvclive"),
        "rss": max(train.rss, evaluate.rss),
        "accuracy": evaluate.number(r"accuracy ([\d.]+)"),
        "images": params["train"]["epochs"] * TRAIN_IMAGES,
    }


def variants_in_order(round_number: int) -> list[str]:
    """Each recipe's portable and native runs side by side, which first alternating from round to
    round so that neither always meets a warmer machine; bf16 only where the CPU has it natively."""
    names = []
    for recipe_name in RECIPES:
        pair = [recipe_name, f"{recipe_name}, native"]
        names += pair if round_number % 2 else pair[::-1]
    for emulated in EMULATED:
        pair = [emulated, emulated.replace(", AVX2-only", ", native, AVX2-only")]
        names += pair if round_number % 2 else pair[::-1]
    bf16 = ["fast, bf16"] if cpu_has_native_bf16() else []
    return [*names, *bf16, "1-thread", "2 processes"]


def run_busy(scratch: Scratch, round_number: int) -> dict:
    """Images a second of a training (default params, 2 epochs) with 1 thread alone, and beside 1 and
    2 busy processes: with its threads fitted to the free cores (the default), and with 1 and 2 fixed."""
    cases = [(0, {"train.num_threads": 1})]
    for busy in (1, 2):
        cases += [(busy, {}), (busy, {"train.num_threads": 1}), (busy, {"train.num_threads": 2})]
    speeds = {}
    for busy, changes in cases if round_number % 2 else cases[::-1]:
        processes = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
        try:
            result = run_variant(scratch, "busy", {"train.epochs": 2} | changes)
        finally:
            for process in processes:
                process.kill()
                process.wait()
        speeds[busy, changes.get("train.num_threads", "fitted")] = result["images"] / result["train"]
    alone = speeds[0, 1]
    return {f"{busy}, {how}": speed / alone for (busy, how), speed in speeds.items()} | {"alone": alone}


def run_steps(scratch: Scratch) -> dict:
    """benchmarks/step_profile.py's split of a step, at batch 64 and at 256."""
    return {
        batch: json.loads(scratch.run(sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), str(batch)).out)
        for batch in (64, 256)
    }


def run_augment(scratch: Scratch, round_number: int) -> dict:
    """The best recipe's first 3 epochs with augmentation and without, the first alternating by round."""
    names = ["best, 3 epochs", "best, 3 epochs, no augmentation"]
    runs = {name: run_variant(scratch, name, VARIANTS[name]) for name in (names if round_number % 2 else names[::-1])}
    with_it, without = (runs[name]["train"] for name in names)
    return {"with": with_it, "without": without, "share": 1 - without / with_it}


def run_best(scratch: Scratch, seed: int) -> dict:
    """The best recipe in full, with train.seed = `seed`."""
    return run_variant(scratch, "best", overrides("best") | {"train.seed": seed}) | {"seed": seed}


def render(results: dict[str, list]) -> list[str]:
    """The tables of the cases that ran: variants (two tables), busy, steps, augment, best."""
    sections = []
    if "default" in results:
        rows = [
            "| train + evaluate stages | wall s | train s | start-up s | of it, DVCLive's import | samples/s "
            "| peak RSS MB | accuracy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in [name for name in VARIANTS if name in results]:
            samples = statistics.median(column(results, name, "images")) / statistics.median(
                column(results, name, "train")
            )
            rows.append(
                f"| {name} | {spread(column(results, name, 'wall'))} | {spread(column(results, name, 'train'), 2)} | "
                f"{spread(column(results, name, 'startup'), 2)} | {spread(column(results, name, 'dvclive'), 2)} | "
                f"{samples:,.0f} | {statistics.median(column(results, name, 'rss')) / 2**20:,.0f} | "
                f"{statistics.median(column(results, name, 'accuracy')):.4f} |"
            )
        sections.append("\n".join(rows) + "\n")
        rows = [
            "| recipe | train s, portable | train s, native | portable / native, within each round "
            "| accuracy, portable | accuracy, native |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in [*RECIPES, *(name for name in EMULATED if name in results)]:
            native = name.replace(",", ", native,") if name in EMULATED else f"{name}, native"
            ratios = [p["train"] / n["train"] for p, n in zip(results[name], results[native], strict=True)]
            rows.append(
                f"| {name} | {spread(column(results, name, 'train'), 2)} | "
                f"{spread(column(results, native, 'train'), 2)} | {spread(ratios, 2)} | "
                f"{statistics.median(column(results, name, 'accuracy')):.4f} | "
                f"{statistics.median(column(results, native, 'accuracy')):.4f} |"
            )
        sections.append("\n".join(rows) + "\n")
    if "busy" in results:
        rows = [
            "| beside busy processes, 2 cores (default params, 2 epochs) | images/s against 1 thread alone "
            "| its fair share of the cores |",
            "|---|---:|---:|",
            f"| 1 thread, alone | 1 ({statistics.median(column(results, 'busy', 'alone')):,.0f} images/s) | 1 |",
        ]
        for busy, share in ((1, "1"), (2, "2/3")):
            for how, label in (("fitted", "threads fitted to the free cores"), (1, "1 thread"), (2, "2 threads")):
                rows.append(
                    f"| beside {busy}, {label} | {spread(column(results, 'busy', f'{busy}, {how}'), 2)} | {share} |"
                )
        sections.append("\n".join(rows) + "\n")
    if "steps" in results:
        rows = [
            "| a training step, ms (torch.profiler's self times) | products | roundings | conversions | optimizer "
            "| other operations | rest: Python, autograd, dispatch | step, under the profiler | step, without it |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for batch in (64, 256):
            for arithmetic in ("native", "portable"):
                parts = [[run[batch][arithmetic][key] for run in results["steps"]] for key in STEP_PARTS]
                rows.append(f"| batch {batch}, {arithmetic} | " + " | ".join(spread(part, 2) for part in parts) + " |")
        sections.append("\n".join(rows) + "\n")
    if "augment" in results:
        sections.append(
            "| augmentation, best recipe (batch 256), 3 epochs | train s |\n|---|---:|\n"
            f"| with augmentation | {spread(column(results, 'augment', 'with'), 2)} |\n"
            f"| every augment strength 0 | {spread(column(results, 'augment', 'without'), 2)} |\n"
            "| augmentation's share of the epoch, within each round | "
            f"{spread(column(results, 'augment', 'share'), 3)} |\n"
        )
    if "best" in results:
        rows = ["| best recipe, train + evaluate stages | train s | wall s | test accuracy |", "|---|---:|---:|---:|"]
        for result in results["best"]:
            rows.append(
                f"| train.seed {result['seed']} | {result['train']:.1f} | {result['wall']:.1f} | "
                f"{result['accuracy']:.4f} |"
            )
        rows.append(
            f"| median (spread) | {spread(column(results, 'best', 'train'))} | "
            f"{spread(column(results, 'best', 'wall'))} | {spread(column(results, 'best', 'accuracy'), 4)} |"
        )
        sections.append("\n".join(rows) + "\n")
    return sections
