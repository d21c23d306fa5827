"""What the experiment loop costs: `dvc exp run` (`exp-run`), two trainings at once (`parallel`) and the
queue's sweep with one worker and with two (`sweep`)."""

import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cells import column, spread
from scratch import ROOT, Scratch, git_repository_of

CASES = ["exp-run", "parallel", "sweep"]

# A stage of the bare pipeline: it imports torch and writes one small file, then exits the way the
# pipeline's stages do (no interpreter teardown; see mnist_pipeline/stage.py).
BARE_STAGE = """import os
import sys

import torch

with open(sys.argv[1], "w") as out:
    out.write(torch.__version__)
os._exit(0)
"""


def recipe(name: str) -> list[str]:
    """The `<section>.<key>=<value>` overrides in recipes/<name>.txt."""
    lines = (ROOT / "recipes" / f"{name}.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


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


def render(results: dict[str, list]) -> list[str]:
    """The tables of the cases that ran: exp-run's, and one for parallel and sweep together."""
    sections = []
    if "exp-run" in results:
        sections.append(
            "| `dvc exp run -S train.epochs=1` | s |\n|---|---:|\n"
            f"| wall | {spread(column(results, 'exp-run', 'wall'), 2)} |\n"
            f"| training | {spread(column(results, 'exp-run', 'train'), 2)} |\n"
            f"| overhead: wall - training | {spread(column(results, 'exp-run', 'overhead'), 2)} |\n"
            f"| the same in a bare pipeline, three stages that only import torch | "
            f"{spread(column(results, 'exp-run', 'bare'), 2)} |\n"
            '| `python -c "import torch"`, the median of three in a row | '
            f"{spread(column(results, 'exp-run', 'import'), 2)} |\n"
            f"| overhead / import, within each round | {spread(column(results, 'exp-run', 'ratio'), 2)} |\n"
            f"| bare pipeline / import, within each round | {spread(column(results, 'exp-run', 'bare ratio'), 2)} |\n"
            f"| back to the baseline (`git checkout HEAD -- . && dvc repro`, run-cache) | "
            f"{spread(column(results, 'exp-run', 'restore'), 2)} |\n"
        )
    if "parallel" in results or "sweep-1" in results:
        rows = ["| sharing 2 cores | wall s | against one at a time |", "|---|---:|---:|"]
        if "parallel" in results:
            rows.append(f"| one training (2 epochs) alone | {spread(column(results, 'parallel', 'alone'))} | |")
            rows.append(
                f"| two at once, until both end | {spread(column(results, 'parallel', 'both'))} | "
                f"throughput {spread(column(results, 'parallel', 'throughput'), 2)} |"
            )
        if "sweep-1" in results:
            ratios = [two / one for one, two in zip(results["sweep-1"], results["sweep-2"], strict=True)]
            rows.append(f"| 4-run grid, queue with 1 worker | {spread(results['sweep-1'])} | |")
            rows.append(
                f"| 4-run grid, `dvc queue start -j 2` | {spread(results['sweep-2'])} | time {spread(ratios, 2)} |"
            )
        sections.append("\n".join(rows) + "\n")
    return sections
