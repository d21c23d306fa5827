"""Plots that open anywhere: DVC's plot pages with vega bundled in, and `make report`'s images.

    python -m mnist_pipeline.report template .dvc/tmp/offline-plots.html   (make setup)
    python -m mnist_pipeline.report report report/ [--base main]            (make report, make pr-report)
    python -m mnist_pipeline.report figures docs/figures/                   (make figures)

`dvc plots show` and `dvc plots diff` write a page that loads vega, vega-lite and vega-embed
from a CDN, so offline it stays blank. .dvc/config points DVC at the template written here,
which carries the three libraries inline (from vl-convert-python, pinned in uv.lock).
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import vl_convert
import yaml

from mnist_pipeline.numerics import pin_kernels
from mnist_pipeline.stage import PipelineError

# DVC's plot templates are Vega-Lite 5 specs.
VEGA_LITE_VERSION = "5.21"

# Draw every view as SVG (crisp, and its marks can be checked) and mark its div once it is drawn.
EMBED_WRAPPER = """
const embedWithCdnFree = window.vegaEmbed;
window.vegaEmbed = (element, spec, options) =>
  embedWithCdnFree(element, spec, { ...options, renderer: "svg" }).then((result) => {
    document.querySelector(element).dataset.drawn = "true";
    return result;
  });
"""

PAGE = """<!DOCTYPE html>
<html>
<head>
  <meta charset="utf-8">
  {refresh_tag}
  <title>DVC plots</title>
  <script>BUNDLE</script>
  <script>WRAPPER</script>
  <style>
    body { font-family: sans-serif; }
    table { border-spacing: 15px; }
  </style>
</head>
<body>
  {plot_divs}
</body>
</html>
"""


def page_template() -> str:
    """An HTML template for `dvc plots` with vega, vega-lite and vega-embed inline, for pages that need no network."""
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    return PAGE.replace("WRAPPER", EMBED_WRAPPER).replace("BUNDLE", bundle.replace("</script", "<\\/script"))


def dvc_json(*arguments: str) -> dict:
    """The JSON that `dvc <arguments> --json` prints."""
    return json.loads(dvc(*arguments, "--json"))


def dvc(*arguments: str) -> str:
    result = subprocess.run(["dvc", *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: dvc {' '.join(arguments)} failed: {result.stderr.strip()}")
    return result.stdout


def file_name(plot_id: str, suffix: str) -> str:
    """A file name for a plot's image, from its id (a path or a title)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", plot_id.removeprefix("metrics/")).strip("-").lower() + suffix


def write_report(folder: Path, base: str = "HEAD") -> list[Path]:
    """Every plot of `dvc plots diff` (the workspace against `base`) as an image, and README.md beside them.

    README.md holds the params and metrics that differ from `base` (`dvc params diff`, `dvc metrics
    diff`), `dvc exp show --only-changed` of HEAD's and base's experiments, and the images: each curve
    with both revisions in one chart, each picture once per revision, side by side. Returns the images
    written.
    """
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    charts, pictures = [], {}
    for plot_id, renderers in dvc_json("plots", "diff", base)["data"].items():
        for renderer in renderers:
            if renderer["type"] == "vega":
                path = folder / file_name(plot_id, ".png")
                path.write_bytes(vl_convert.vegalite_to_png(renderer["content"], vl_version=VEGA_LITE_VERSION, scale=2))
                charts.append(path)
            else:  # an image plot: a renderer, and a picture, per revision
                [revision] = renderer["revisions"]
                path = folder / file_name(f"{plot_id} {revision}", Path(renderer["url"]).suffix)
                shutil.copyfile(renderer["url"], path)
                pictures.setdefault(plot_id, {})[revision] = path
    summary = [
        f"# Experiment report: the workspace against {base}",
        "",
        f"## Params that differ from {base} (`dvc params diff`)",
        "",
        dvc("params", "diff", base, "--md").strip() or "No param changed.",
        "",
        f"## Metrics against {base} (`dvc metrics diff`)",
        "",
        dvc("metrics", "diff", base, "--md").strip() or "No metric changed.",
        "",
        f"## Experiments (`dvc exp show --only-changed`, from HEAD and {base})",
        "",
        # With the base's row, a param that the branch changed has its column, and its old value beside the new.
        dvc(
            "exp", "show", *(f"--rev={rev}" for rev in dict.fromkeys(("HEAD", base))), "--only-changed", "--md"
        ).strip(),
        "",
        f"## Plots (`dvc plots diff`: the workspace against {base})",
        "",
        *(f"![{path.stem}]({path.name})\n" for path in charts),
    ]
    for plot_id, by_revision in pictures.items():
        revisions = sorted(by_revision, key=lambda revision: revision == "workspace")  # the workspace last
        summary += [
            f"### {plot_id}",
            "",
            "| " + " | ".join(revisions) + " |",
            "|" + "---|" * len(revisions),
            "| " + " | ".join(f"![{plot_id} {r}]({by_revision[r].name})" for r in revisions) + " |",
            "",
        ]
    (folder / "README.md").write_text("\n".join(summary) + "\n")
    return charts + [path for by_revision in pictures.values() for path in by_revision.values()]


# The README's pictures: DVCLive's curves of the committed baseline, by metric, with their file names and
# titles. (dvc.yaml names the folder DVCLive writes them to; DVCLive names each curve's file after its metric.)
FIGURES = {
    "train/loss": ("training-loss", "Training loss (cross-entropy)"),
    "test/accuracy": ("test-accuracy", "Test accuracy"),
}
AUGMENTATION_FIGURE = "augmentation.gif"  # what the best recipe's augmentation does, drawn from data/mnist


def write_figures(folder: Path) -> list[Path]:
    """The README's pictures of the committed baseline: a PNG of each plot in FIGURES, and beside it
    the Vega-Lite spec it was drawn from, data inline. The pixels depend on the machine's fonts; the
    spec does not, so it is what a test compares with what this makes from the committed metrics.
    """
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "metrics"]).returncode != 0:
        raise SystemExit(
            "error: metrics/ differs from HEAD, and the figures show the committed baseline: "
            "return to it with git checkout -- . && uv run dvc checkout"
        )
    folder.mkdir(parents=True, exist_ok=True)
    written = [write_augmentation_figure(folder / AUGMENTATION_FIGURE)]
    plots = dvc_json("plots", "show")["data"]
    for metric, (name, title) in FIGURES.items():
        [renderer] = next(renderers for plot_id, renderers in plots.items() if plot_id.endswith(f"/{metric}.tsv"))
        # DVC's spec, titled for a reader rather than by its file, and without the legend of its one revision.
        spec = renderer["content"] | {"title": title, "config": {"legend": {"disable": True}}}
        (folder / f"{name}.vl.json").write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")
        (folder / f"{name}.png").write_bytes(vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE_VERSION, scale=2))
        written.append(folder / f"{name}.png")
    return written


def write_augmentation_figure(path: Path) -> Path:
    """The train stage's picture of augmented digits (first row as they are, then four deformations),
    for the augment params of recipes/best.txt and the train.seed of params.yaml, drawn from data/mnist.
    It has no text, so its bytes are the same on every machine, as the train stage's picture's are."""
    # Torch loads here, after its kernels are pinned as in every stage (numerics.py), since the pixels
    # must be the ones every machine draws; the other commands of this module need no torch.
    pin_kernels()
    import torch

    from mnist_pipeline.augment import examples
    from mnist_pipeline.data import load_mnist, to_tensors
    from mnist_pipeline.params import AugmentParams, read_recipe
    from mnist_pipeline.pictures import digits_grid, write_gif

    recipe = read_recipe(Path("recipes/best.txt"))
    augment = AugmentParams(
        **{key.removeprefix("augment."): v for key, v in recipe.items() if key.startswith("augment.")}
    )
    seed = yaml.safe_load(Path("params.yaml").read_text())["train"]["seed"]
    images, labels = to_tensors(*load_mnist(Path("data/mnist"), "train"), torch.device("cpu"))
    write_gif(digits_grid(examples(images, labels, augment, seed)), path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("template", help="write the offline template for dvc plots").add_argument("path", type=Path)
    report = commands.add_parser("report", help="write every plot as an image, plus README.md")
    report.add_argument("folder", type=Path)
    report.add_argument("--base", default="HEAD", help="the revision to compare the workspace with (default HEAD)")
    commands.add_parser("figures", help="draw the README's plots of the committed baseline").add_argument(
        "folder", type=Path
    )
    args = parser.parse_args(argv)
    if args.command == "template":
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_text(page_template())
    elif args.command == "figures":
        try:
            written = write_figures(args.folder)
        except PipelineError as error:  # no data/mnist: the augmentation figure is drawn from it
            raise SystemExit(f"error: {error}") from None
        print(*written, sep="\n")
    else:
        images = write_report(args.folder, args.base)
        print(f"{args.folder / 'README.md'}: {len(images)} plots as images")


if __name__ == "__main__":
    sys.exit(main())
