"""make bench: this pipeline against the tutorial's loop, and what the experiment loop costs.

Everything runs in a scratch copy of the project (its own git repository and DVC cache) on real
MNIST, fetched from MNIST_MIRROR (relative to the project root) or the internet, with the
commands a user types. Each case runs --runs times, round-robin, so that the machine's drifts in
speed hit every case alike; the tables give medians with the spread (min-max) beside them, and
ratios are taken within a round, between neighbours.

  tutorial  benchmarks/tutorial_baseline.py: the seed tutorial's loop, with its test pass per epoch
  repro     `dvc repro --force --downstream train`: train, evaluate and export at default params
  variants  the train and evaluate stages alone: the default, fast and medium recipes with the portable
            arithmetic (the default) and with the machine's native one, in turn; default and fast again as
            on a CPU with AVX2 alone (MKL and oneDNN held to AVX2); bf16 where the CPU has it; 1 thread;
            2 processes
  busy      a training (default params, 2 epochs) beside 1 and beside 2 busy processes, fitting its
            threads to the free cores, and with 1 and with 2 threads fixed; against 1 thread alone
  steps     where a training step's time goes at batch 64 and 256, in both arithmetics
            (benchmarks/step_profile.py: products, roundings, conversions, optimizer, the rest)
  augment   the share of an epoch that augmentation takes: the best recipe for 3 epochs, and the same
            with every augment strength 0, in turn
  best      the best recipe (the train and evaluate stages), with train.seed = the round's number
  exp-run   `dvc exp run -S train.epochs=1` (a new seed each time, so nothing is cached), the same
            in a bare DVC project whose three stages only import torch (the least three torch
            stages can take), `python -c "import torch"` three times, then back to the baseline:
            `git checkout HEAD -- . && dvc repro`
  parallel  two trainings (2 epochs, default params) at once against one alone
  sweep     the 4-run grid of recipes/sweep.txt through the queue with one worker, and with two

    uv run python benchmarks/bench.py [--runs 3] [--only tutorial repro ...]
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mnist_pipeline.numerics import describe_cpu
from mnist_pipeline.params import read_recipe
from mnist_pipeline.training import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parent.parent
TRAIN_IMAGES = 60_000


def recipe(name: str) -> list[str]:
    """The `<section>.<key>=<value>` overrides in recipes/<name>.txt."""
    lines = (ROOT / "recipes" / f"{name}.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


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


@dataclass
class Run:
    wall: float
    rss: int  # peak resident set of the process or its largest descendant, bytes
    lines: list[tuple[float, str]]  # stdout lines with their arrival times, seconds from the start
    stderr: str

    @property
    def out(self) -> str:
        return "".join(line for _, line in self.lines)

    def number(self, pattern: str) -> float:
        """The first group of the last match of `pattern` in stdout."""
        return float(re.findall(pattern, self.out, re.MULTILINE)[-1])


@dataclass
class Scratch:
    path: Path
    env: dict[str, str]
    seeds: int = 1000  # unique seeds, so that no experiment is answered by the run-cache

    def run(self, *command: str) -> Run:
        """Run `command` in the scratch copy; fail loudly if it fails."""
        with tempfile.TemporaryFile("w+") as stderr:
            start = time.perf_counter()
            process = subprocess.Popen(
                command,
                cwd=self.path,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
            lines = [(time.perf_counter() - start, line) for line in process.stdout]
            _, status, usage = os.wait4(process.pid, 0)
            wall = time.perf_counter() - start
            stderr.seek(0)
            errors = stderr.read()
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(
                f"{' '.join(command)} failed:\n{''.join(line for _, line in lines)[-2000:]}{errors[-2000:]}"
            )
        return Run(wall, usage.ru_maxrss * 1024, lines, errors)

    def run_with(self, variables: dict[str, str]) -> Callable[..., Run]:
        """self.run with `variables` added to the environment."""
        return Scratch(self.path, self.env | variables).run

    def new_seed(self) -> int:
        self.seeds += 1
        return self.seeds


def make_scratch(parent: Path) -> Scratch:
    """A copy of the project as git would commit it, with the baseline reproduced and committed."""
    path = parent / "project"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, path / name)
    venv = Path(sys.executable).parent
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "MNIST_MIRROR")}
    env |= {"PATH": f"{venv}{os.pathsep}{env['PATH']}", "VIRTUAL_ENV": str(venv.parent), "PYTHONUNBUFFERED": "1"}
    if mirror := os.environ.get("MNIST_MIRROR"):
        env["MNIST_MIRROR"] = mirror if "://" in mirror else str((ROOT / mirror).resolve())
    scratch = Scratch(path, env)
    git_repository_of(scratch, "scratch")
    print("setting up: dvc repro (download and the default baseline)", flush=True)
    scratch.run("dvc", "repro")
    scratch.run("git", "add", "-A")
    scratch.run("git", "commit", "-qm", "baseline", "--allow-empty")
    (path / ".bench").mkdir()
    return scratch


def git_repository_of(scratch: Scratch, message: str) -> None:
    """Make the folder a git repository and commit everything in it."""
    for command in (
        ["git", "init", "-q"],
        ["git", "config", "user.name", "bench"],
        ["git", "config", "user.email", "bench@example.com"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", message],
    ):
        scratch.run(*command)


# A stage of the bare pipeline: it imports torch and writes one small file, then exits the way the
# pipeline's stages do (no interpreter teardown; see mnist_pipeline/stage.py).
BARE_STAGE = """import os
import sys

import torch

with open(sys.argv[1], "w") as out:
    out.write(torch.__version__)
os._exit(0)
"""


def make_bare(parent: Path, env: dict[str, str]) -> Scratch:
    """A DVC project of three chained stages that only import torch, each depending on the param `seed`."""
    bare = Scratch(parent / "bare", env)
    bare.path.mkdir()
    (bare.path / "stage.py").write_text(BARE_STAGE)
    (bare.path / "params.yaml").write_text("seed: 0\n")
    stages, deps = {}, ["stage.py"]
    for name in ("first", "second", "third"):
        out = f"{name}.txt"
        stages[name] = {"cmd": f"python stage.py {out}", "deps": deps, "params": ["seed"], "outs": [out]}
        deps = ["stage.py", out]
    (bare.path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    git_repository_of(bare, "bare")
    bare.run("dvc", "init", "-q")
    bare.run("dvc", "config", "core.analytics", "false")  # as in this project's .dvc/config
    bare.run("dvc", "repro")
    bare.run("git", "add", "-A")
    bare.run("git", "commit", "-qm", "baseline")
    return bare


def import_seconds(importtime: str, module: str) -> float:
    """Cumulative time of `import <module>` from the stderr of `python -X importtime`."""
    for line in importtime.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) == 3 and fields[2].strip() == module:
            return int(fields[1]) / 1e6
    raise ValueError(f"no `import {module}` in the -X importtime output")


def run_tutorial(scratch: Scratch) -> dict:
    run = scratch.run(sys.executable, str(ROOT / "benchmarks" / "tutorial_baseline.py"), "data/mnist")
    return {"wall": run.wall, "rss": run.rss, "accuracy": run.number(r"accuracy ([\d.]+)")}


def run_repro(scratch: Scratch) -> dict:
    run = scratch.run("dvc", "repro", "--force", "--downstream", "train")
    return {
        "wall": run.wall,
        "train": run.number(r"^trained \d+ epochs?(?: on \d+ processes)? in ([\d.]+) s"),
        "rss": run.rss,
        "accuracy": run.number(r"^test loss [\d.]+, accuracy ([\d.]+)"),
    }


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
        *("--metrics", str(work / "eval.json"), "--per-digit", str(work / "per_digit.csv")),
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


def run_augment(scratch: Scratch, round_number: int) -> dict:
    """The best recipe's first 3 epochs with augmentation and without, the first alternating by round."""
    names = ["best, 3 epochs", "best, 3 epochs, no augmentation"]
    runs = {name: run_variant(scratch, name, VARIANTS[name]) for name in (names if round_number % 2 else names[::-1])}
    with_it, without = (runs[name]["train"] for name in names)
    return {"with": with_it, "without": without, "share": 1 - without / with_it}


def run_best(scratch: Scratch, seed: int) -> dict:
    """The best recipe in full, with train.seed = `seed`."""
    return run_variant(scratch, "best", overrides("best") | {"train.seed": seed}) | {"seed": seed}


def run_experiment(scratch: Scratch, bare: Scratch) -> dict:
    """One new experiment, one in the bare pipeline, the yardstick import, and the way back to the baseline's params."""
    seed = scratch.new_seed()
    run = scratch.run("dvc", "exp", "run", "-S", "train.epochs=1", "-S", f"train.seed={seed}")
    train = run.number(r"^trained \d+ epochs?(?: on \d+ processes)? in ([\d.]+) s")
    bare_run = bare.run("dvc", "exp", "run", "-S", f"seed={seed}")
    # This machine pages out files that go about a minute unread (the kernel's DAMON reclaim), so
    # one import may read torch from disk; the middle of three in a row is a stage's warm import.
    yardstick = statistics.median(scratch.run(sys.executable, "-c", "import torch").wall for _ in range(3))
    checkout = scratch.run("git", "checkout", "HEAD", "--", ".")
    restore = scratch.run("dvc", "repro")
    if "Running stage" in restore.out:
        raise SystemExit(f"returning to the baseline ran a stage instead of restoring it:\n{restore.out}")
    return {
        "wall": run.wall,
        "train": train,
        "overhead": run.wall - train,
        "import": yardstick,
        "ratio": (run.wall - train) / yardstick,
        "bare": bare_run.wall,
        "bare ratio": bare_run.wall / yardstick,
        "restore": checkout.wall + restore.wall,
    }


def run_parallel(scratch: Scratch) -> dict:
    """Wall time of one 2-epoch training, then of two at once (each with its own outputs)."""
    params = yaml.safe_load((scratch.path / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (scratch.path / ".bench" / "two-epochs.yaml").write_text(yaml.safe_dump(params))

    def command(name: str) -> list[str]:
        return [
            *(sys.executable, "-m", "stages.train", "--params", ".bench/two-epochs.yaml", "--data", "data/mnist"),
            *("--checkpoint", f".bench/{name}.pt", "--live", f".bench/{name}", "--augmented", f".bench/{name}.png"),
        ]

    alone = scratch.run(*command("alone")).wall
    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            command(name), cwd=scratch.path, env=scratch.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for name in ("first", "second")
    ]
    if any(process.wait() for process in processes):
        raise SystemExit("a training of the pair failed")
    both = time.perf_counter() - start
    return {"alone": alone, "both": both, "throughput": 2 * alone / both}


BUSY = "while True: pass"
STEP_PARTS = ["products", "roundings", "conversions", "optimizer", "other operations", "rest", "profiled", "step"]


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


def run_sweep(scratch: Scratch, workers: int) -> float:
    """Wall time of the 4-run grid through the queue, from `dvc queue start` to the last result."""
    scratch.run(
        "dvc", "exp", "run", "--queue", *(f"-S{s}" for s in [*recipe("sweep"), f"train.seed={scratch.new_seed()}"])
    )
    names = re.findall(r"^\w+\s+(\S+)\s.*\bQueued$", scratch.run("dvc", "queue", "status").out, re.MULTILINE)
    start = time.perf_counter()
    scratch.run("dvc", "queue", "start", "--jobs", str(workers))
    for name in names:
        scratch.run("dvc", "queue", "logs", "--follow", name)  # returns when that experiment ends
    wall = time.perf_counter() - start
    status = scratch.run("dvc", "queue", "status").out
    if len(names) != 4 or not all(re.search(rf"^\w+\s+{name}\s.*\bSuccess$", status, re.MULTILINE) for name in names):
        raise SystemExit(f"the sweep did not succeed:\n{status}")
    scratch.run("dvc", "queue", "remove", "--success")  # the experiments stay; only the task records go
    return wall


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


def spread(values: list[float], digits: int = 1) -> str:
    """Median, then min-max when the values differ."""
    median = f"{statistics.median(values):.{digits}f}"
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return median if low == high else f"{median} ({low}-{high})"


def main() -> None:
    cases = ["tutorial", "repro", "variants", "busy", "steps", "augment", "best", "exp-run", "parallel", "sweep"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=cases, help="cases to run (default: all)")
    args = parser.parse_args()
    chosen = [case for case in cases if not args.only or case in args.only]
    results: dict[str, list] = {}

    def record(name: str, measure: Callable[[], dict | float]) -> None:
        result = measure()
        results.setdefault(name, []).append(result)
        shown = result if isinstance(result, float) else result.get("wall", result.get("both", result.get("with", 0)))
        print(f"  {name}: {shown:.1f} s" if shown else f"  {name}: {result}", flush=True)

    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as parent:
        scratch = make_scratch(Path(parent))
        bare = make_bare(Path(parent), scratch.env) if "exp-run" in chosen else None
        for round_number in range(1, args.runs + 1):
            print(f"round {round_number}/{args.runs}", flush=True)
            if "tutorial" in chosen:
                record("tutorial", lambda: run_tutorial(scratch))
            if "repro" in chosen:
                record("repro", lambda: run_repro(scratch))
            if "variants" in chosen:
                for name in variants_in_order(round_number):
                    record(name, lambda name=name: run_variant(scratch, name, VARIANTS[name]))
            if "busy" in chosen:
                record("busy", lambda round_number=round_number: run_busy(scratch, round_number))
            if "steps" in chosen:
                record("steps", lambda: run_steps(scratch))
            if "augment" in chosen:
                record("augment", lambda round_number=round_number: run_augment(scratch, round_number))
            if "best" in chosen:
                record("best", lambda seed=round_number: run_best(scratch, seed))
            if "exp-run" in chosen:
                record("exp-run", lambda: run_experiment(scratch, bare))
            if "parallel" in chosen:
                record("parallel", lambda: run_parallel(scratch))
            if "sweep" in chosen:
                # Alternate which goes first, so that neither always meets a warmer machine.
                for workers in (1, 2) if round_number % 2 else (2, 1):
                    record(f"sweep-{workers}", lambda workers=workers: run_sweep(scratch, workers))
    report = render(results, args.runs)
    print("\n" + report)
    with (ROOT / "benchmarks" / "results.md").open("a") as log:  # the bench's log: every run, newest last
        command = " ".join(["python benchmarks/bench.py", *sys.argv[1:]])
        log.write(f"\n## {time.strftime('%Y-%m-%d %H:%M %Z')}, `{command}`\n\n{report}")


def render(results: dict[str, list], runs: int) -> str:
    """The results as markdown tables."""

    def column(name: str, key: str) -> list[float]:
        return [result[key] for result in results[name]]

    sections = [
        f"`make bench`: {runs} rounds on {describe_cpu()}, torch {torch.__version__}. "
        "Medians, with the spread (min-max) in brackets.\n"
    ]
    if "tutorial" in results and "repro" in results:
        ratios = [r["wall"] / t["wall"] for r, t in zip(results["repro"], results["tutorial"], strict=True)]
        sections.append(
            "| the whole job, default params | wall s | train s | peak RSS MB | test accuracy |\n"
            "|---|---:|---:|---:|---:|\n"
            f"| tutorial loop | {spread(column('tutorial', 'wall'))} | - | "
            f"{statistics.median(column('tutorial', 'rss')) / 2**20:,.0f} | "
            f"{statistics.median(column('tutorial', 'accuracy')):.4f} |\n"
            f"| `dvc repro --force --downstream train` | {spread(column('repro', 'wall'))} | "
            f"{spread(column('repro', 'train'))} | {statistics.median(column('repro', 'rss')) / 2**20:,.0f} | "
            f"{statistics.median(column('repro', 'accuracy')):.4f} |\n\n"
            f"dvc repro / tutorial, within each round: {spread(ratios, 2)}\n"
        )
    if "default" in results:
        rows = [
            "| train + evaluate stages | wall s | train s | start-up s | of it, DVCLive's import | samples/s "
            "| peak RSS MB | accuracy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in [name for name in VARIANTS if name in results]:
            samples = statistics.median(column(name, "images")) / statistics.median(column(name, "train"))
            rows.append(
                f"| {name} | {spread(column(name, 'wall'))} | {spread(column(name, 'train'), 2)} | "
                f"{spread(column(name, 'startup'), 2)} | {spread(column(name, 'dvclive'), 2)} | {samples:,.0f} | "
                f"{statistics.median(column(name, 'rss')) / 2**20:,.0f} | "
                f"{statistics.median(column(name, 'accuracy')):.4f} |"
            )
        sections.append("\n".join(rows) + "\n")
    if "default" in results:
        rows = [
            "| recipe | train s, portable | train s, native | portable / native, within each round "
            "| accuracy, portable | accuracy, native |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in [*RECIPES, *(name for name in EMULATED if name in results)]:
            native = name.replace(",", ", native,") if name in EMULATED else f"{name}, native"
            ratios = [p["train"] / n["train"] for p, n in zip(results[name], results[native], strict=True)]
            rows.append(
                f"| {name} | {spread(column(name, 'train'), 2)} | {spread(column(native, 'train'), 2)} | "
                f"{spread(ratios, 2)} | {statistics.median(column(name, 'accuracy')):.4f} | "
                f"{statistics.median(column(native, 'accuracy')):.4f} |"
            )
        sections.append("\n".join(rows) + "\n")
    if "busy" in results:
        rows = [
            "| beside busy processes, 2 cores (default params, 2 epochs) | images/s against 1 thread alone "
            "| its fair share of the cores |",
            "|---|---:|---:|",
            f"| 1 thread, alone | 1 ({statistics.median(column('busy', 'alone')):,.0f} images/s) | 1 |",
        ]
        for busy, share in ((1, "1"), (2, "2/3")):
            for how, label in (("fitted", "threads fitted to the free cores"), (1, "1 thread"), (2, "2 threads")):
                rows.append(f"| beside {busy}, {label} | {spread(column('busy', f'{busy}, {how}'), 2)} | {share} |")
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
            f"| with augmentation | {spread(column('augment', 'with'), 2)} |\n"
            f"| every augment strength 0 | {spread(column('augment', 'without'), 2)} |\n"
            f"| augmentation's share of the epoch, within each round | {spread(column('augment', 'share'), 3)} |\n"
        )
    if "best" in results:
        rows = ["| best recipe, train + evaluate stages | train s | wall s | test accuracy |", "|---|---:|---:|---:|"]
        for result in results["best"]:
            rows.append(
                f"| train.seed {result['seed']} | {result['train']:.1f} | {result['wall']:.1f} | "
                f"{result['accuracy']:.4f} |"
            )
        rows.append(
            f"| median (spread) | {spread(column('best', 'train'))} | {spread(column('best', 'wall'))} | "
            f"{spread(column('best', 'accuracy'), 4)} |"
        )
        sections.append("\n".join(rows) + "\n")
    if "exp-run" in results:
        sections.append(
            "| `dvc exp run -S train.epochs=1` | s |\n|---|---:|\n"
            f"| wall | {spread(column('exp-run', 'wall'), 2)} |\n"
            f"| training | {spread(column('exp-run', 'train'), 2)} |\n"
            f"| overhead: wall - training | {spread(column('exp-run', 'overhead'), 2)} |\n"
            f"| the same in a bare pipeline, three stages that only import torch | "
            f"{spread(column('exp-run', 'bare'), 2)} |\n"
            f'| `python -c "import torch"`, the median of three in a row | {spread(column("exp-run", "import"), 2)} |\n'
            f"| overhead / import, within each round | {spread(column('exp-run', 'ratio'), 2)} |\n"
            f"| bare pipeline / import, within each round | {spread(column('exp-run', 'bare ratio'), 2)} |\n"
            f"| back to the baseline (`git checkout HEAD -- . && dvc repro`, run-cache) | "
            f"{spread(column('exp-run', 'restore'), 2)} |\n"
        )
    if "parallel" in results or "sweep-1" in results:
        rows = ["| sharing 2 cores | wall s | against one at a time |", "|---|---:|---:|"]
        if "parallel" in results:
            rows.append(f"| one training (2 epochs) alone | {spread(column('parallel', 'alone'))} | |")
            rows.append(
                f"| two at once, until both end | {spread(column('parallel', 'both'))} | "
                f"throughput {spread(column('parallel', 'throughput'), 2)} |"
            )
        if "sweep-1" in results:
            ratios = [two / one for one, two in zip(results["sweep-1"], results["sweep-2"], strict=True)]
            rows.append(f"| 4-run grid, queue with 1 worker | {spread(results['sweep-1'])} | |")
            rows.append(
                f"| 4-run grid, `dvc queue start -j 2` | {spread(results['sweep-2'])} | time {spread(ratios, 2)} |"
            )
        sections.append("\n".join(rows) + "\n")
    return "\n".join(sections)


if __name__ == "__main__":
    main()
