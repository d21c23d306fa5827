"""The README and docs/ stay true: links and pictures resolve, the pictures are the committed
baseline's, the stage graph is dvc.yaml's, and the shell commands they show are valid."""

import re
import shlex
from functools import cache
from pathlib import Path

import pytest
from conftest import FILES, PROJECT, copy_project, idx_bytes, run, synthetic_split
from dvc.cli import DvcParserError, parse_args
from PIL import Image

from mnist_pipeline.report import AUGMENTATION_FIGURE, FIGURES

PAGES = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # a "# comment" in a block is no heading
    return {slug(heading) for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def shell_blocks(page: Path) -> list[str]:
    return re.findall(r"^```(?:sh|bash)\n(.*?)^```", page.read_text(), re.DOTALL | re.MULTILINE)


def test_the_readme_is_short_and_opens_with_the_pictures_and_the_quick_start():
    lines = (PROJECT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    first_screen = "\n".join(lines[:40])
    assert "docs/figures/" in first_screen and "metrics/mistakes.png" in first_screen
    assert "make repro" in first_screen and "make test" in first_screen


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_and_picture_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: {target} names no heading of {linked.name}"


def test_the_readme_draws_the_stage_graph_of_dvc_yaml():
    graph = run(PROJECT, "dvc", "dag", "--md").stdout.strip()
    assert graph in (PROJECT / "README.md").read_text()


def test_the_figures_are_what_make_figures_draws_from_the_committed_metrics(tmp_path):
    copy = copy_project(tmp_path)
    result = run(copy, "python", "-m", "mnist_pipeline.report", "figures", "docs/figures", check=False)
    assert result.returncode != 0  # the augmentation figure is drawn from data/mnist, which the copy lacks
    assert result.stderr.strip().splitlines() == [
        "error: data/mnist/train-images-idx3-ubyte: file not found (run the download stage: dvc repro download)"
    ]
    # With data (synthetic here: test_real_mnist compares the real picture), all of them.
    (copy / "data" / "mnist").mkdir(parents=True)
    for split in ("train", "test"):
        for name, array in zip(FILES[split], synthetic_split(200, seed=0), strict=True):
            (copy / "data" / "mnist" / name).write_bytes(idx_bytes(array))
    run(copy, "python", "-m", "mnist_pipeline.report", "figures", "docs/figures")  # what `make figures` runs
    with Image.open(copy / "docs" / "figures" / AUGMENTATION_FIGURE) as picture:
        assert picture.size == (10 * (3 * 28 + 4) + 4, 5 * (3 * 28 + 4) + 4)  # ten digits, five rows
    for name, _ in FIGURES.values():
        # The pixels depend on the machine's fonts; what they are drawn from does not.
        spec = f"docs/figures/{name}.vl.json"
        assert (copy / spec).read_text() == (PROJECT / spec).read_text(), f"{spec} is stale: make figures"
        with Image.open(PROJECT / "docs" / "figures" / f"{name}.png") as picture:
            assert picture.format == "PNG" and picture.width > 300 and picture.height > 200


def test_make_figures_refuses_metrics_that_are_not_the_committed_ones(tmp_path):
    copy = copy_project(tmp_path)
    (copy / "metrics" / "eval.json").write_text('{"loss": 1.0, "accuracy": 0.5}\n')
    result = run(copy, "python", "-m", "mnist_pipeline.report", "figures", "docs/figures", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: metrics/ differs from HEAD")


def shell_commands(page: Path) -> list[list[str]]:
    """Each command in the page's sh blocks, as words, comments dropped."""
    commands = []
    for block in shell_blocks(page):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)
            for command in filter(str.strip, line.split("&&")):
                commands.append(shlex.split(command.strip()))
    return [words for words in commands if words]


def test_the_dvc_and_make_commands_in_the_docs_are_valid():
    targets = set(re.findall(r"^([\w .-]+):", (PROJECT / "Makefile").read_text(), re.MULTILINE))
    targets = {target for line in targets for target in line.split()}
    checked = 0
    for page in PAGES:
        for words in shell_commands(page):
            while re.match(r"[A-Z_]+=", words[0]):  # VAR=value before the command
                words = words[1:]
            if words[:2] == ["uv", "run"]:
                words = words[2:]
            if words[:1] == ["dvc"]:
                try:
                    parse_args(words[1:])  # DVC's own command-line parser: subcommand and options
                except (SystemExit, DvcParserError):  # an unknown command or option
                    pytest.fail(f"{page.name}: not a valid dvc command: {shlex.join(words)}")
                checked += 1
            elif words[:1] == ["make"]:
                assert set(words[1:]) <= targets, f"{page.name}: no such make target: {shlex.join(words)}"
                checked += 1
    assert checked >= 25  # the blocks were found and read
