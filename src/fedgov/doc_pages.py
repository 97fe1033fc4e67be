"""The documentation site's generated pages: the configuration reference from ``fedgov.config``,
and one page per experiment from its committed results, so that neither can drift from what it
describes.

``mkdocs.yml`` loads this file as a hook (``on_files``): every ``mkdocs build`` and ``mkdocs serve``
writes the pages afresh, and copies each experiment's figures into the site. Nothing generated is
committed. Each committed figure (experiments' and benchmarks') is copied into the site. An experiment's page is its prose (``experiments/NAME.md``, written by hand, with
``{{ table }}``, ``{{ figure }}`` and ``{{ figure_rounds }}`` where the generated parts go), the
command that makes it, the setup and code version from ``experiment.json``, and the table of
``results.csv``. ``python -m fedgov.doc_pages DIR`` writes the same pages to DIR, to read them
without MkDocs.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
RESULTS = EXPERIMENTS / "results"
BENCHMARK_RESULTS = ROOT / "benchmarks" / "results"
CONFIG_PAGE = "reference/config.md"
FIGURES = ("figure.png", "figure_rounds.png")
PLACEHOLDER = re.compile(r"\{\{\s*(table|figure|figure_rounds)\s*\}\}")

__all__ = ["config_reference_page", "experiment_names", "experiment_page", "pages"]


def config_reference_page() -> str:
    """Every config key with its default and meaning, as ``python -m fedgov.config`` prints them."""
    from fedgov.config import reference_table  # absolute: MkDocs loads this file by its path

    lines = ["# Configuration reference", "",
             "Every key of fedgov's one typed config, generated from `fedgov.config` when the site is "
             "built. Set a key in a TOML file (`--config FILE`, sections as in `configs/default.toml`) "
             "or on the command line (`--set section.key=value`); `python -m fedgov.config` prints this "
             "table. A bad key, type or value is one line naming it, exit status 2, before anything starts.",
             "", reference_table()]
    return "\n".join(lines) + "\n"


def experiment_names(experiments: Path = EXPERIMENTS) -> list[str]:
    """Experiments with committed results, in file order."""
    return sorted(p.stem for p in experiments.glob("*.toml") if (experiments / "results" / p.stem /
                                                                  "results.csv").is_file())


def _number(text: str) -> str:
    value = float(text)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3f}"


def _cell(row: dict[str, str], metric: str) -> str:
    mean = row.get(f"{metric}_mean", "")
    if mean == "":
        return "-"
    if row["n"] == "1" or row.get(f"{metric}_ci95_low", "") == "":
        return _number(mean)
    return f"{_number(mean)} [{_number(row[f'{metric}_ci95_low'])}, {_number(row[f'{metric}_ci95_high'])}]"


def results_markdown(results_csv: Path, metrics: Sequence[str], labels: dict[str, str]) -> str:
    """results.csv as a Markdown table: the grid's values, n, and mean [95% CI] per metric."""
    with results_csv.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        rows = list(reader)
    axes = header[header.index("point") + 1:header.index("n")]
    columns = [*(labels.get(a, a) for a in axes), "n", *(labels.get(m, m) for m in metrics)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        n = row["n"] + (f" ({row['failed']} failed)" if row.get("failed", "0") not in ("", "0") else "")
        cells = [*(f"`{row[a]}`" for a in axes), n, *(_cell(row, m) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _minutes(meta: dict[str, Any]) -> str:
    try:
        span = datetime.fromisoformat(meta["finished"].replace("Z", "+00:00")) - datetime.fromisoformat(
            meta["started"].replace("Z", "+00:00"))
    except (KeyError, TypeError, ValueError):
        return "unknown"
    return f"{span.total_seconds() / 60:.1f} min"


def _code(meta: dict[str, Any]) -> str:
    code = meta.get("code") or {}
    commit = code.get("git_commit") or code.get("fedgov_version") or "unknown"
    dirty = " (with uncommitted changes)" if code.get("git_dirty") else ""
    return f"`{commit[:10]}`{dirty}, sources `{str(code.get('source_hash', ''))[:12]}`"


def experiment_page(name: str, experiments: Path = EXPERIMENTS, figure_prefix: str = "") -> str:
    """One experiment's page: its prose, command, setup, results table and figures."""
    results = experiments / "results" / name
    meta = json.loads((results / "experiment.json").read_text())
    labels = (meta.get("plot") or {}).get("labels") or {}
    prose_path = experiments / f"{name}.md"
    prose = prose_path.read_text() if prose_path.is_file() else f"# {name}\n\n{meta.get('description', '')}\n"
    title, _, body = prose.partition("\n")
    grid = {**(meta.get("grid") or {}), **({"variant": list(meta["variants"])} if meta.get("variants") else {})}
    stale = meta.get("stale_runs") or 0
    setup = [
        "```bash", f"python -m fedgov.experiment experiments/{name}.toml", "```", "",
        f"*{meta.get('description', '')}.* Defined in `experiments/{name}.toml` over "
        f"`{Path(str(meta.get('base', 'configs/default.toml'))).name}`; results in `experiments/results/{name}/` "
        f"(`results.csv`: mean and 95% Student-t interval over seeds; `runs.csv`: every run).", "",
        "| | |", "|---|---|",
        *(f"| `{key}` | {', '.join(f'`{v}`' for v in values)} |" for key, values in grid.items()),
        f"| seeds | {', '.join(map(str, meta.get('seeds') or []))} |",
        f"| runs | {len(meta.get('runs') or [])}{f' ({stale} stale)' if stale else ''} |",
        f"| wall time | {_minutes(meta)} (`{meta.get('invocation', '')}`) |",
        f"| code | {_code(meta)} |",
    ]
    parts = {"table": "Mean [95% CI] over seeds, from `results.csv`:\n\n"
                      + results_markdown(results / "results.csv", meta.get("metrics") or [], labels)}
    for figure in FIGURES:
        key = figure.removesuffix(".png")
        parts[key] = (f"![{meta.get('description', name)}]({figure_prefix}{name}/{figure})"
                      if (results / figure).is_file() else "")
    used = set(PLACEHOLDER.findall(body))
    body = PLACEHOLDER.sub(lambda m: parts[m.group(1)], body).strip()
    tail = [parts[k] for k in ("table", "figure", "figure_rounds") if k not in used and parts[k]]
    return "\n\n".join([title, "\n".join(setup), body, *tail]).rstrip() + "\n"


def pages(experiments: Path = EXPERIMENTS) -> Iterator[tuple[str, str]]:
    """(path in the site's docs, Markdown) for every generated page."""
    yield CONFIG_PAGE, config_reference_page()
    for name in experiment_names(experiments):
        yield f"experiments/{name}.md", experiment_page(name, experiments, figure_prefix="results/")


def figures(experiments: Path = EXPERIMENTS, benchmarks: Path = BENCHMARK_RESULTS) -> Iterator[tuple[str, Path]]:
    """(path in the site, file) for every committed experiment and benchmark figure."""
    for name in experiment_names(experiments):
        for figure in FIGURES:
            if (path := experiments / "results" / name / figure).is_file():
                yield f"experiments/results/{name}/{figure}", path
    for path in sorted(benchmarks.glob("*/*.png")):
        yield f"benchmarks/results/{path.parent.name}/{path.name}", path


def on_files(files, config):  # noqa: ANN001, ANN201 (MkDocs' hook: the generated pages join the site)
    from mkdocs.structure.files import File

    for uri, text in pages():
        files.append(File.generated(config, uri, content=text))
    for uri, path in figures():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedgov.doc_pages DIR``: write the generated pages under DIR."""
    from fedgov.cli import ArgumentParser

    p = ArgumentParser(prog="python -m fedgov.doc_pages",
                       description="Write the documentation site's generated pages (the configuration "
                                   "reference and one page per experiment) under DIR.")
    p.add_argument("out", type=Path, metavar="DIR")
    args = p.parse_args(argv)
    for uri, text in pages():
        path = args.out / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
