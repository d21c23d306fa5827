"""The whole job: the seed tutorial's loop (`tutorial`) against `dvc repro` of the pipeline (`repro`)."""

import statistics
import sys

from cells import column, spread
from scratch import ROOT, Scratch

CASES = ["tutorial", "repro"]


def run_tutorial(scratch: Scratch) -> dict:
    """benchmarks/tutorial_baseline.py on the scratch copy's MNIST."""
    run = scratch.run(sys.executable, str(ROOT / "benchmarks" / "tutorial_baseline.py"), "data/mnist")
    return {"wall": run.wall, "rss": run.rss, "accuracy": run.number(r"accuracy ([\d.]+)")}


def run_repro(scratch: Scratch) -> dict:
    """Train, evaluate and export at default params, through `dvc repro`."""
    run = scratch.run("dvc", "repro", "--force", "--downstream", "train")
    return {
        "wall": run.wall,
        "train": run.number(r"^trained \d+ epochs?(?: on \d+ processes)? in ([\d.]+) s"),
        "rss": run.rss,
        "accuracy": run.number(r"^test loss [\d.]+, accuracy ([\d.]+)"),
    }


def render(results: dict[str, list]) -> list[str]:
    """The whole job's table, where both cases ran."""
    if "tutorial" not in results or "repro" not in results:
        return []
    ratios = [r["wall"] / t["wall"] for r, t in zip(results["repro"], results["tutorial"], strict=True)]
    return [
        "| the whole job, default params | wall s | train s | peak RSS MB | test accuracy |\n"
        "|---|---:|---:|---:|---:|\n"
        f"| tutorial loop | {spread(column(results, 'tutorial', 'wall'))} | - | "
        f"{statistics.median(column(results, 'tutorial', 'rss')) / 2**20:,.0f} | "
        f"{statistics.median(column(results, 'tutorial', 'accuracy')):.4f} |\n"
        f"| `dvc repro --force --downstream train` | {spread(column(results, 'repro', 'wall'))} | "
        f"{spread(column(results, 'repro', 'train'))} | "
        f"{statistics.median(column(results, 'repro', 'rss')) / 2**20:,.0f} | "
        f"{statistics.median(column(results, 'repro', 'accuracy')):.4f} |\n\n"
        f"dvc repro / tutorial, within each round: {spread(ratios, 2)}\n"
    ]
