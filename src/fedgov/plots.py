"""Figures, drawn only from saved results (CSV/JSON files), never from live objects.

``python -m fedgov.plots run RUN_DIR [-o out.png]`` draws a run's accuracy per round
from its ``metrics.jsonl``; ``python -m fedgov.plots experiment RESULTS_DIR [-o out.png]``
redraws an experiment's figure from its ``results.csv`` and ``experiment.json``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and no GUI backend in worker processes

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from .results import read_json, read_jsonl  # noqa: E402

import tomllib

__all__ = ["plot_experiment", "plot_frontier", "plot_run", "main"]

DPI = 150
_COLORS = plt.get_cmap("tab10").colors


def _save(fig: Figure, out_png: str | Path, *, dpi: int) -> Path:
    """Save beside the target and rename, so a crash never leaves half a PNG."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_png.parent, prefix=f".{out_png.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out_png


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _pretty(name: str, labels: Mapping[str, str]) -> str:
    return labels.get(name, name.replace("_", " "))


def _style(ax: Any) -> None:
    ax.grid(True, which="major", alpha=0.3)
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)


def _seeds_note(ns: Sequence[int]) -> str:
    ns = sorted(set(n for n in ns if n > 0))
    if not ns:
        return "no successful runs"
    if ns == [1]:
        return "one seed per point: no confidence interval"
    counts = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return f"mean and 95% CI (Student t) over n = {counts} seeds per point"


def _read_csv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def plot_experiment(results_csv: str | Path, plot_spec: Mapping[str, Any], out_png: str | Path,
                    *, runs_csv: str | Path | None = None, dpi: int = DPI) -> Path:
    """Mean lines with 95% CI error bars and bands, one panel per metric in ``plot_spec["y"]``, shared x.

    ``plot_spec`` is the ``plot`` entry of ``experiment.json``: ``x``, ``y``, and optionally
    ``series``, ``xscale``, ``ylog`` (metrics on a log axis), ``title`` and ``labels`` (display
    names for keys and metrics). Categorical x (variants, names) gets markers, not lines.
    With ``runs_csv`` each seed's own value is drawn too, as a faint dot.
    """
    rows = _read_csv(results_csv)
    runs = [r for r in _read_csv(runs_csv) if r.get("status") in ("ok", "done")] if runs_csv else []
    x_key, metrics = plot_spec["x"], list(plot_spec["y"])
    series_key = plot_spec.get("series")
    labels: Mapping[str, str] = plot_spec.get("labels") or {}
    log_x = plot_spec.get("xscale", "linear") == "log"
    for column in [x_key, "n"] + ([series_key] if series_key else []):
        if rows and column not in rows[0]:
            raise ValueError(f"{results_csv}: no column {column!r}")

    # Numeric x is placed by value; anything else (strategy names) as evenly spaced categories.
    raw_x = [row[x_key] for row in rows]
    numeric = all(not math.isnan(_float(v)) for v in raw_x)
    categories = list(dict.fromkeys(raw_x))
    position = {v: (_float(v) if numeric else float(i)) for i, v in enumerate(categories)}

    groups: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(row[series_key] if series_key else "", []).append(row)

    values = list(position.values())
    span = 1.0 if not numeric or log_x else (max(values) - min(values)) or 1.0

    def place(x_text: str, index: int, *, nudge: float = 0.0) -> float:
        # Series (and seed dots) sit a little apart so error bars do not hide each other.
        shift = ((index - (len(groups) - 1) / 2) * 0.04 if len(groups) > 1 else 0.0) + nudge
        if x_text not in position:
            return math.nan
        return position[x_text] * 10 ** shift if log_x else position[x_text] + shift * span

    has_ci = any(_float(r["n"]) > 1 for r in rows)
    fig, axes = plt.subplots(len(metrics), 1, sharex=True, squeeze=False,
                             figsize=(7.5, 1.0 + 2.9 * len(metrics)))
    for panel, metric in enumerate(metrics):
        ax = axes[panel][0]
        for index, (name, members) in enumerate(groups.items()):
            color = _COLORS[index % len(_COLORS)]
            mine = [r for r in runs if (r.get(series_key) if series_key else "") == name]
            seeds_y = [_float(r.get(metric)) for r in mine]
            if has_ci and mine:
                ax.scatter([place(r.get(x_key, ""), index, nudge=0.025) for r in mine], seeds_y, s=16,
                           color=color, alpha=0.55, linewidths=0, zorder=3,
                           label=None if series_key else "each seed")
            members = sorted(members, key=lambda r: position[r[x_key]])
            xs = [place(r[x_key], index) for r in members]
            mean = [_float(r.get(f"{metric}_mean")) for r in members]
            low = [_float(r.get(f"{metric}_ci95_low")) for r in members]
            high = [_float(r.get(f"{metric}_ci95_high")) for r in members]
            keep = [i for i, m in enumerate(mean) if not math.isnan(m)]
            if not keep:
                continue
            xs, mean, low, high = ([seq[i] for i in keep] for seq in (xs, mean, low, high))
            label = f"{_pretty(series_key, labels)} = {name}" if series_key else "mean over seeds"
            # Categories (variants, strategy names) have no order to draw a line along.
            ax.errorbar(xs, mean, yerr=[[m - lo for m, lo in zip(mean, low)], [hi - m for m, hi in zip(mean, high)]],
                        color=color, marker="o", markersize=6 if not numeric else 5,
                        linewidth=1.8 if numeric else 0, elinewidth=1.8, capsize=4, label=label)
            if numeric:
                ax.fill_between(xs, low, high, color=color, alpha=0.15, linewidth=0,
                                label="95% CI" if has_ci and not series_key else None)
            elif not series_key:
                for x, m in zip(xs, mean):
                    ax.annotate(f"{m:.3g}", (x, m), textcoords="offset points", xytext=(7, 3),
                                fontsize="x-small", color="0.25")
        if metric in plot_spec.get("ylog", ()):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 2e+05, not 2 x 10^5
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(_pretty(metric, labels))
        _style(ax)
        if panel == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize="small", loc="best")

    bottom = axes[-1][0]
    if log_x:
        bottom.set_xscale("log")
    if numeric:
        ticks = sorted(set(position.values()))
        bottom.set_xticks(ticks, [f"{t:g}" for t in ticks])
        bottom.minorticks_off()
    else:
        bottom.set_xticks(range(len(categories)), categories, rotation=25 if len(categories) > 4 else 0,
                          ha="right" if len(categories) > 4 else "center")
    bottom.set_xlabel(_pretty(x_key, labels))
    title = plot_spec.get("title") or Path(results_csv).parent.name
    note = _seeds_note([int(_float(r["n"])) if r["n"] else 0 for r in rows])
    fig.suptitle(textwrap.fill(title, 60), fontsize="large", fontweight="bold")
    axes[0][0].set_title(note, fontsize="small", color="0.35")
    fig.tight_layout()
    return _save(fig, out_png, dpi=dpi)


def plot_frontier(results_csv: str | Path, plot_spec: Mapping[str, Any], out_png: str | Path, *,
                  dpi: int = DPI) -> Path:
    """One point per grid point, metric ``x`` against each metric in ``y`` (one row of panels each),
    labelled by ``point``, coloured by ``series`` (a key, or a list whose value combinations each
    get a colour), one column per ``facet`` combination; 95% CI error bars in both directions."""
    rows = _read_csv(results_csv)
    labels: Mapping[str, str] = plot_spec.get("labels") or {}
    x, ys, series = plot_spec["x"], list(plot_spec["y"]), plot_spec.get("series")
    series_keys = [series] if isinstance(series, str) else list(series or [])
    series_of = lambda r: ", ".join(r[k] for k in series_keys)  # noqa: E731
    series_title = ", ".join(_pretty(k, labels) for k in series_keys)
    point = plot_spec["point"]
    point_keys = [point] if isinstance(point, str) else list(point)  # one label from one or more grid keys
    facets = list(plot_spec.get("facet") or [])
    facet_of = lambda r: " / ".join(f"{_pretty(k, labels)} = {r[k]}" for k in facets)  # noqa: E731
    panels = list(dict.fromkeys(facet_of(r) for r in rows)) or [""]
    names = list(dict.fromkeys(series_of(r) for r in rows)) if series_keys else [""]
    fig, axes = plt.subplots(len(ys), len(panels), squeeze=False, sharex="col", sharey="row",
                             figsize=(1.5 + 3.6 * len(panels), 0.8 + 3.0 * len(ys)))

    def interval(r: Mapping[str, str], m: str) -> tuple[float, float, float]:
        mean = _float(r.get(f"{m}_mean"))
        low, high = _float(r.get(f"{m}_ci95_low")), _float(r.get(f"{m}_ci95_high"))
        return mean, (mean - low if not math.isnan(low) else 0.0), (high - mean if not math.isnan(high) else 0.0)

    note = plot_spec.get("note")

    def label_of(r: Mapping[str, str]) -> str:
        """The point's name, and with ``note`` that metric's mean as a percentage (e.g. a sybil's share)."""
        defaults = plot_spec.get("point_defaults") or {}
        short = plot_spec.get("point_names") or {}
        name = " / ".join(f"{short[k]}={r[k]}" if k in short else r[k]
                          for i, k in enumerate(point_keys) if i == 0 or r[k] != defaults.get(k))
        value = _float(r.get(f"{note}_mean")) if note else math.nan
        return name if math.isnan(value) else f"{name} ({value:.0%})"

    for row_i, metric in enumerate(ys):
        for col, panel in enumerate(panels):
            ax = axes[row_i][col]
            for index, name in enumerate(names):
                members = [r for r in rows if facet_of(r) == panel and (not series_keys or series_of(r) == name)]
                pts = [(interval(r, x), interval(r, metric), label_of(r)) for r in members]
                pts = [p for p in pts if not (math.isnan(p[0][0]) or math.isnan(p[1][0]))]
                if not pts:
                    continue
                color = _COLORS[index % len(_COLORS)]
                ax.errorbar([p[0][0] for p in pts], [p[1][0] for p in pts],
                            xerr=[[p[0][1] for p in pts], [p[0][2] for p in pts]],
                            yerr=[[p[1][1] for p in pts], [p[1][2] for p in pts]], fmt="o", color=color,
                            markersize=5, elinewidth=1.2, capsize=3,
                            label=f"{series_title} = {name}" if series_keys else None)
                for (px, py, text) in pts:
                    ax.annotate(text, (px[0], py[0]), textcoords="offset points", xytext=(5, 3),
                                fontsize="x-small", color=color)
            if row_i == 0 and panel:
                ax.set_title(panel, fontsize="small")
            if col == 0:
                ax.set_ylabel(_pretty(metric, labels))
            if row_i == len(ys) - 1:
                ax.set_xlabel(_pretty(x, labels))
            if plot_spec.get("xscale") == "log":  # e.g. Nakamoto coefficients from 1 to thousands
                ax.set_xscale("log")
            _style(ax)
    if series_keys and axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(frameon=False, fontsize="x-small", loc="best")
    title = plot_spec.get("title") or Path(results_csv).parent.name
    if len(point_keys) > 1:
        title += f"; points: {' / '.join(_pretty(k, labels) for k in point_keys)}"
    if note:
        title += f"; in brackets: {_pretty(note, labels)}"
    fig.suptitle(textwrap.fill(title, 40 + 30 * len(panels)), fontsize="large", fontweight="bold")
    fig.tight_layout()
    return _save(fig, out_png, dpi=dpi)


def plot_rounds(rounds_csv: str | Path, plot_spec: Mapping[str, Any], out_png: str | Path, *,
                dpi: int = DPI) -> Path:
    """Per-round metrics (``plot_spec["rounds"]``), one panel each, one line per grid point.

    Lines are means over seeds; the band is the range (min to max) over seeds, which stays
    readable with two or three seeds where a Student t interval would fill the panel.
    Line styles differ as well as colours, so identical curves (FedAvg with and without HE,
    say) stay visible on top of each other. With one metric and two ``facet`` keys the panels
    form a grid, a row per value of the first key and a column per value of the second (as a
    paper's figure of datasets by straggler rates).
    """
    rows = _read_csv(rounds_csv)
    only = plot_spec.get("rounds_only") or []  # [{axis: [values]}]: draw the points matching an entry
    if only:
        rows = [r for r in rows if any(all(r.get(k) in {str(v) for v in values} for k, values in entry.items())
                                       for entry in only)]
    labels: Mapping[str, str] = plot_spec.get("labels") or {}
    metrics = list(plot_spec.get("rounds") or [])
    # a frontier's facets (one column each), or the learning curves' own (rounds_facet)
    facets = list(plot_spec.get("rounds_facet") or plot_spec.get("facet") or [])
    fields = list(rows[0]) if rows else []
    axes_keys = fields[1:fields.index("metric")] if "metric" in fields else []
    shown = [k for k in axes_keys if k not in facets and len({r[k] for r in rows}) > 1] or axes_keys[:1]
    line_names = list(dict.fromkeys(", ".join(r[k] for k in shown) for r in rows))  # one colour each, all panels
    facet_of = lambda r: " / ".join(f"{_pretty(k, labels)} = {r[k]}" for k in facets)  # noqa: E731
    panels = list(dict.fromkeys(facet_of(r) for r in rows)) or [""]
    styles = ["-", "--", ":", "-."]
    grid = len(metrics) == 1 and len(facets) == 2
    if grid:  # rows by the first facet key, columns by the second
        row_values = list(dict.fromkeys(r[facets[0]] for r in rows))
        col_values = list(dict.fromkeys(r[facets[1]] for r in rows))
        cells = [(metrics[0], f"{_pretty(facets[0], labels)} = {a} / {_pretty(facets[1], labels)} = {b}")
                 for a in row_values for b in col_values]
        shape = (len(row_values), len(col_values))
    else:
        cells = [(metric, panel) for metric in metrics for panel in panels]
        shape = (len(metrics), len(panels))
    fig, axes = plt.subplots(*shape, sharex="col", sharey="row", squeeze=False,
                             figsize=(1.5 + 7.0 * shape[1] if shape[1] == 1 else 1.5 + 4.6 * shape[1],
                                      1.4 + 3.4 * shape[0]))
    for index_cell, (metric, panel) in enumerate(cells):
        row_i, col = divmod(index_cell, shape[1])
        ax = axes[row_i][col]
        points = list(dict.fromkeys(r["point"] for r in rows if r["metric"] == metric and facet_of(r) == panel))
        for index, point in enumerate(points):
            mine = sorted((r for r in rows if r["metric"] == metric and r["point"] == point and r["n"] != "0"),
                          key=lambda r: _float(r["round"]))
            if not mine:
                continue
            xs = [_float(r["round"]) for r in mine]
            name = ", ".join(mine[0][k] for k in shown)  # the axis values that tell the lines apart
            style = line_names.index(name)
            color = _COLORS[style % len(_COLORS)]
            ax.plot(xs, [_float(r["mean"]) for r in mine], color=color, linewidth=2.0,
                    linestyle=styles[style % len(styles)], label=name)
            if any(_float(r["n"]) > 1 for r in mine):
                ax.fill_between(xs, [_float(r["min"]) for r in mine], [_float(r["max"]) for r in mine],
                                color=color, alpha=0.10, linewidth=0)
        if (row_i == 0 or grid) and panel:  # a grid titles every cell
            ax.set_title(panel, fontsize="small")
        if col == 0:
            ax.set_ylabel(_pretty(metric, labels))
        _style(ax)
        if row_i == 0 and col == 0 and len(panels) == 1:
            ax.legend(frameon=False, fontsize="small", loc="best", ncol=2)
    for ax in axes[-1]:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ns = sorted({int(_float(r["n"])) for r in rows if r["n"] and r["n"] != "0"})
    title = plot_spec.get("title") or Path(rounds_csv).parent.name
    fig.suptitle(textwrap.fill(title, 60), fontsize="large", fontweight="bold")
    seeds = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}" if ns else "0"
    caption = f"mean over n = {seeds} seeds; shaded: min to max over seeds"
    if len(panels) == 1 and not panels[0]:
        axes[0][0].set_title(caption, fontsize="small", color="0.35")
        fig.tight_layout()
    else:  # one legend for every panel, below them, naming the varying keys
        handles, names = {}, []
        for ax in axes.flat:
            for handle, name in zip(*ax.get_legend_handles_labels()):
                if name not in handles:
                    handles[name] = handle
                    names.append(name)
        legend_title = ", ".join(_pretty(k, labels) for k in shown)
        fig.legend([handles[n] for n in names], names, loc="lower center", ncol=min(len(names), 4),
                   frameon=False, fontsize="small", title=f"{legend_title}; {caption}", title_fontsize="small")
        fig.tight_layout(rect=(0, 0.08 + 0.03 * math.ceil(len(names) / 4), 1, 1))
    return _save(fig, out_png, dpi=dpi)


def _run_title(run_dir: Path) -> str:
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        return f"run {run_dir.name}"
    cfg = tomllib.loads(config_path.read_text())
    data, strategy = cfg.get("data", {}), cfg.get("strategy", {})
    split = data.get("partition", "?")
    if split == "dirichlet" and isinstance(data.get("alpha"), (int, float)):
        split += f" (alpha = {data['alpha']:g})"
    return (f"{data.get('dataset', '?')}, {data.get('num_cooperatives', '?')} cooperatives, {split}, "
            f"{strategy.get('name', '?')}, seed {cfg.get('seed', '?')}")


def plot_run(run_dir: str | Path, out_png: str | Path, *, dpi: int = DPI) -> Path:
    """Global and worst-cooperative accuracy per round (shading: worst to best cooperative)."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no rounds recorded")
    rounds = [r["round"] for r in rows]
    coop = [[v for v in r.get("cooperative_accuracy", {}).values() if v is not None] for r in rows]
    worst = [min(c) if c else math.nan for c in coop]
    best = [max(c) if c else math.nan for c in coop]

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.fill_between(rounds, worst, best, color=_COLORS[1], alpha=0.15, linewidth=0,
                    label="range over cooperatives")
    ax.plot(rounds, [r["accuracy"] for r in rows], color=_COLORS[0], marker="o", markersize=4,
            linewidth=1.8, label="global accuracy (server test set)")
    ax.plot(rounds, worst, color=_COLORS[1], marker="v", markersize=4, linewidth=1.8,
            label="worst cooperative (local test split)")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    if len(rounds) <= 25:
        ax.set_xticks(rounds)
    _style(ax)
    ax.legend(frameon=False, fontsize="small", loc="lower right")
    fig.suptitle(f"Accuracy per round: {_run_title(run_dir)}", fontsize="medium", fontweight="bold")
    fig.tight_layout()
    return _save(fig, out_png, dpi=dpi)


def _parser() -> argparse.ArgumentParser:
    from .cli import ArgumentParser

    p = ArgumentParser(prog="python -m fedgov.plots", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    run = sub.add_parser("run", help="accuracy per round of one run directory")
    run.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (holds metrics.jsonl)")
    run.add_argument("-o", "--out", type=Path, default=None, help="PNG file (default: RUN_DIR/accuracy.png)")
    exp = sub.add_parser("experiment", help="an experiment's figures from its results folder (figure.png, and "
                                            "figure_rounds.png where it has per-round series)")
    exp.add_argument("results_dir", type=Path, metavar="RESULTS_DIR",
                     help="an experiment's results folder (holds results.csv and experiment.json)")
    exp.add_argument("-o", "--out", type=Path, default=None, help="PNG file (default: RESULTS_DIR/figure.png)")
    exp.add_argument("--spec", type=Path, default=None, metavar="EXPERIMENT_TOML",
                     help="draw with this experiment file's [experiment.plot] (a layout changed after the runs) "
                          "instead of the one experiment.json recorded; the numbers still come from RESULTS_DIR")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.what == "run":
            if not (args.run_dir / "metrics.jsonl").is_file():
                raise ValueError(f"{args.run_dir}: not a run directory (no metrics.jsonl)")
            path = plot_run(args.run_dir, args.out or args.run_dir / "accuracy.png")
        else:
            for name in ("results.csv", "experiment.json"):
                if not (args.results_dir / name).is_file():
                    raise ValueError(f"{args.results_dir}: not an experiment folder (no {name})")
            meta = read_json(args.results_dir / "experiment.json")
            spec = meta["plot"]
            if args.spec is not None:
                from .experiment.spec import load_experiment

                spec = load_experiment(args.spec).plot
            runs = args.results_dir / "runs.csv"
            if spec.get("kind") == "frontier":
                if "point_defaults" not in spec:  # an experiment.json from before labels left them out
                    base = meta.get("base_config") or {}
                    spec["point_defaults"] = {k: str(base[k]) for k in spec["point"][1:] if k in base}
                path = plot_frontier(args.results_dir / "results.csv", spec, args.out or args.results_dir / "figure.png")
            else:
                path = plot_experiment(args.results_dir / "results.csv", spec,
                                       args.out or args.results_dir / "figure.png",
                                       runs_csv=runs if runs.is_file() else None)
            rounds_csv = args.results_dir / "rounds.csv"
            if spec.get("rounds") and rounds_csv.is_file() and args.out is None:
                print(plot_rounds(rounds_csv, spec, args.results_dir / "figure_rounds.png"))
    except (OSError, ValueError, KeyError) as exc:
        from .cli import fail

        fail("fedgov.plots", str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
