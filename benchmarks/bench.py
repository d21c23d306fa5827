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
  model     models/model.pt against a plain float32 TorchScript export of the same weights, at batch 1
            and 1000, alternating, in a Python with torch alone (benchmarks/model_speed.py)

    uv run python benchmarks/bench.py [--runs 3] [--only tutorial repro ...]
"""

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import experiment_cases
import model_cases
import pipeline_cases
import training_cases
from mnist_pipeline.numerics import describe_cpu
from scratch import ROOT, make_scratch

# Each kind of case: a module with CASES, the names --only takes, and render(results), the markdown
# sections of its tables. The cases run, and their tables follow one another, in this order.
CASE_MODULES = [pipeline_cases, training_cases, experiment_cases, model_cases]


def main() -> None:
    """Run the chosen cases round-robin, print the report and append it to benchmarks/results.md."""
    cases = [case for module in CASE_MODULES for case in module.CASES]
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
        bare = experiment_cases.make_bare(Path(parent), scratch.env) if "exp-run" in chosen else None
        for round_number in range(1, args.runs + 1):
            print(f"round {round_number}/{args.runs}", flush=True)
            if "tutorial" in chosen:
                record("tutorial", lambda: pipeline_cases.run_tutorial(scratch))
            if "repro" in chosen:
                record("repro", lambda: pipeline_cases.run_repro(scratch))
            if "variants" in chosen:
                for name in training_cases.variants_in_order(round_number):
                    record(
                        name, lambda name=name: training_cases.run_variant(scratch, name, training_cases.VARIANTS[name])
                    )
            if "busy" in chosen:
                record("busy", lambda round_number=round_number: training_cases.run_busy(scratch, round_number))
            if "steps" in chosen:
                record("steps", lambda: training_cases.run_steps(scratch))
            if "augment" in chosen:
                record("augment", lambda round_number=round_number: training_cases.run_augment(scratch, round_number))
            if "best" in chosen:
                record("best", lambda seed=round_number: training_cases.run_best(scratch, seed))
            if "exp-run" in chosen:
                record("exp-run", lambda: experiment_cases.run_experiment(scratch, bare))
            if "parallel" in chosen:
                record("parallel", lambda: experiment_cases.run_parallel(scratch))
            if "sweep" in chosen:
                # Alternate which goes first, so that neither always meets a warmer machine.
                for workers in (1, 2) if round_number % 2 else (2, 1):
                    record(f"sweep-{workers}", lambda workers=workers: experiment_cases.run_sweep(scratch, workers))
            if "model" in chosen:
                record("model", lambda: model_cases.run_model(scratch))
    report = render(results, args.runs)
    print("\n" + report)
    with (ROOT / "benchmarks" / "results.md").open("a") as log:  # the bench's log: every run, newest last
        command = " ".join(["python benchmarks/bench.py", *sys.argv[1:]])
        log.write(f"\n## {time.strftime('%Y-%m-%d %H:%M %Z')}, `{command}`\n\n{report}")


def render(results: dict[str, list], runs: int) -> str:
    """The results as markdown tables: a line on the machine, then each kind of case's tables."""
    header = (
        f"`make bench`: {runs} rounds on {describe_cpu()}, torch {torch.__version__}. "
        "Medians, with the spread (min-max) in brackets.\n"
    )
    return "\n".join([header, *(section for module in CASE_MODULES for section in module.render(results))])


if __name__ == "__main__":
    main()
