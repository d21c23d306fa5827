"""Side by side on real MNIST: the tutorial's training loop against this pipeline's train + evaluate.

Every variant runs --runs times, round-robin so that drifts in machine speed hit all alike;
the table shows medians. Wall time covers whole processes (interpreter, imports, data,
training, test); train s is the training loop alone, as the train stage reports it;
start-up s runs from process start to the first training step, less `import torch`.
Needs data/mnist (`uv run dvc repro download`). Writes the table to benchmarks/results.md too.

    uv run python benchmarks/bench.py [--runs 3] [--only fast best]
"""

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "mnist"
TRAIN_IMAGES = 60_000


def recipe(name: str) -> dict:
    """train.* overrides from recipes/<name>.txt."""
    lines = (ROOT / "recipes" / f"{name}.txt").read_text().splitlines()
    return {
        key.removeprefix("train."): yaml.safe_load(value)
        for key, value in (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    }


VARIANTS = {
    "tutorial": None,  # benchmarks/tutorial_baseline.py, the reference for the ratio
    "default": {},
    "bf16": {"precision": "bf16"},
    "1-thread": {"num_threads": 1},
    "2-threads": {"num_threads": 2},
    "fast": recipe("fast"),
    "best": recipe("best"),
}


def run_measured(command: list[str], cwd: Path, env: dict) -> tuple[float, int, list[tuple[float, str]], str]:
    """Wall seconds, peak RSS in bytes, stdout lines with their arrival times, and stderr of one process."""
    with tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        lines = [(time.perf_counter() - start, line) for line in process.stdout]
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        stderr.seek(0)
        errors = stderr.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(command)} failed:\n{errors[-2000:]}")
    return wall, usage.ru_maxrss * 1024, lines, errors


def torch_import_seconds(importtime: str) -> float:
    """Cumulative time of `import torch` from the stderr of `python -X importtime`."""
    for line in importtime.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) == 3 and fields[2].strip() == "torch":
            return int(fields[1]) / 1e6
    raise ValueError("no `import torch` in the -X importtime output")


def run_tutorial(env: dict) -> dict:
    wall, rss, lines, _ = run_measured([sys.executable, "benchmarks/tutorial_baseline.py", str(DATA)], ROOT, env)
    accuracy = float(re.findall(r"accuracy ([\d.]+)", "".join(line for _, line in lines))[-1])
    return {"wall": wall, "train": None, "startup": None, "rss": rss, "accuracy": accuracy, "images": 9 * TRAIN_IMAGES}


def run_pipeline(overrides: dict, env: dict) -> dict:
    """train.py then evaluate.py in a scratch copy whose params.yaml has the overrides."""
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        shutil.copytree(ROOT / "stages", work / "stages")
        (work / "data").mkdir()
        (work / "data" / "mnist").symlink_to(DATA)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["train"].update(overrides)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**env, "PYTHONPATH": str(ROOT)}
        train_wall, train_rss, train_lines, importtime = run_measured(
            [sys.executable, "-X", "importtime", "stages/train.py"], work, env
        )
        eval_wall, eval_rss, eval_lines, _ = run_measured([sys.executable, "stages/evaluate.py"], work, env)
    train_out, eval_out = ("".join(line for _, line in lines) for lines in (train_lines, eval_lines))
    # The stage prints "training on ..." right before its first step.
    first_step = next(seconds for seconds, line in train_lines if line.startswith("training on"))
    return {
        "wall": train_wall + eval_wall,
        "train": float(re.search(r"trained \d+ epochs in ([\d.]+) s", train_out).group(1)),
        "startup": first_step - torch_import_seconds(importtime),
        "rss": max(train_rss, eval_rss),
        "accuracy": float(re.search(r"accuracy ([\d.]+)", eval_out).group(1)),
        "images": params["train"]["epochs"] * TRAIN_IMAGES,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=VARIANTS, help="variants to run (default: all)")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is missing: run `uv run dvc repro download` first")
    names = [name for name in VARIANTS if not args.only or name in args.only]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    results: dict[str, list[dict]] = {name: [] for name in names}
    for run in range(1, args.runs + 1):
        for name in names:
            overrides = VARIANTS[name]
            result = run_tutorial(env) if overrides is None else run_pipeline(overrides, env)
            results[name].append(result)
            print(
                f"run {run}/{args.runs} {name}: {result['wall']:.1f} s, accuracy {result['accuracy']:.4f}", flush=True
            )

    def median(name: str, key: str) -> float | None:
        values = [r[key] for r in results[name] if r[key] is not None]
        return statistics.median(values) if values else None

    baseline = median("tutorial", "wall") if "tutorial" in results else None
    rows = [
        "| variant | wall s | train s | start-up s | samples/s | peak RSS MB | test accuracy | wall / tutorial |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        wall, train, startup = median(name, "wall"), median(name, "train"), median(name, "startup")
        rows.append(
            f"| {name} | {wall:.1f} | {'-' if train is None else f'{train:.2f}'} | "
            f"{'-' if startup is None else f'{startup:.2f}'} | "
            f"{median(name, 'images') / (train or wall):,.0f} | {median(name, 'rss') / 2**20:,.0f} | "
            f"{median(name, 'accuracy'):.4f} | {'-' if baseline is None else f'{wall / baseline:.2f}'} |"
        )
    header = (
        f"Medians of {args.runs} runs on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}. samples/s: training images per second of the training loop "
        f"(of the whole process for the tutorial, which has no separate figure). start-up s: process start "
        f"to the first training step, less `import torch`."
    )
    table = "\n".join([header, "", *rows])
    print("\n" + table)
    (ROOT / "benchmarks" / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
