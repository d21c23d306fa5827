"""The scratch copy of the project that the bench's cases run in, and how they run commands there."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    """A finished command: its wall time, memory and output."""

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
    """A project folder and the environment its commands run with."""

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
