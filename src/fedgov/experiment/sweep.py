"""A whole sweep: :func:`run_experiment` runs every (grid point, seed) job not yet done, a few
at a time, shows progress, and writes the tables after every run and the figures at the end.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from ..provenance import code_version, describe_code
from ..results import read_json
from . import runner as _runner
from .runner import Job, Runner, RunResult, build_jobs, execute_job
from .spec import QUICK_COOPERATIVES, QUICK_ROUNDS, Experiment, metric_value
from .stats import CI_LEVEL
from .tables import _relative, write_outputs

__all__ = ["run_experiment"]


class _Reporter:
    """A rich progress bar on stderr when it is a terminal, else one plain line per run."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.total = total
        self.count = 0
        self.console = Console(stderr=True)
        self.tty = sys.stderr.isatty()
        self.progress = Progress(TextColumn("[bold]runs"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                 console=self.console) if self.tty else None
        self.task: Any = None

    def __enter__(self) -> _Reporter:
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("runs", total=self.total, status="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def started(self, job: Job) -> None:
        if self.progress is not None:
            self.progress.update(self.task, status=f"{job.point.id} seed {job.seed}")

    def finished(self, result: RunResult, metrics: Sequence[str]) -> None:
        self.count += 1
        job = result.job
        if result.succeeded:
            values = "  ".join(f"{m} {v:.4f}" for m in metrics
                               if (v := metric_value(result.summary or {}, m)) is not None)
            if result.status == "done" and result.stale:
                how = f"kept STALE (made by other code: {describe_code(result.code)}; --reuse-stale)"
            elif result.status == "done":
                how = "kept (summary.json exists, same code)"
            else:
                how = f"ok in {result.seconds:.0f} s"
                if result.replaced_stale:
                    how += " (the finished run there was made by other code)"
                if result.stale:
                    how += f" STALE (the sources changed during the sweep: {describe_code(result.code)})"
            line = f"[{self.count}/{self.total}] {job.point.id} seed {job.seed}: {how}  {values}"
        else:
            last = result.error.splitlines()[-1] if result.error else ""
            line = f"[{self.count}/{self.total}] {job.point.id} seed {job.seed}: FAILED (exit {result.returncode}) {last}"
        if self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False)
            self.progress.update(self.task, completed=self.count)
        else:
            print(line, file=sys.stderr, flush=True)


def _earlier_runs(out: Path) -> dict[tuple[str, int, str], dict[str, Any]]:
    """The runs recorded by an earlier invocation into the same folder, by (point, seed, run dir)."""
    try:
        runs = read_json(out / "experiment.json").get("runs", [])
    except (OSError, ValueError, AttributeError):
        return {}
    return {(r.get("point"), r.get("seed"), r.get("run_dir")): r for r in runs if isinstance(r, dict)}


def run_experiment(exp: Experiment, *, out: Path, seeds: Sequence[int] | None = None, quick: bool = False,
                   jobs: int = 1, runner: Runner | None = None, argv: Sequence[str] = (),
                   reuse_stale: bool = False, code: Mapping[str, Any] | None = None) -> list[RunResult]:
    """Run every (point, seed) not yet done; write runs.csv, results.csv, experiment.json, figure.png.

    ``code``: the code running now (default :func:`fedgov.provenance.code_version`). A finished
    run is kept only when that code made it; with ``reuse_stale`` one made by other code is
    kept too, and marked stale in every table.
    """
    runner = runner or _runner.subprocess_runner  # looked up now, so tests can monkeypatch it
    code = dict(code) if code is not None else code_version()
    if seeds is None:
        seeds = exp.seeds[:1] if quick else exp.seeds
    todo = build_jobs(exp, out, seeds=seeds, quick=quick)
    plot = dict(exp.plot)
    if quick:  # the title describes the full runs; say that these are not them
        plot["title"] = f"{plot['title']} [--quick: {QUICK_ROUNDS} rounds, <= {QUICK_COOPERATIVES} cooperatives]"
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": exp.name,
        "description": exp.description,
        "experiment_file": str(exp.path),
        "experiment_toml": exp.text,
        "invocation": shlex.join(["python", "-m", "fedgov.experiment", *argv]),
        "python": sys.executable,
        "code": code,  # the code that made every run not marked stale
        "reuse_stale": reuse_stale,
        "base": str(exp.base_path),
        "base_config": exp.base.to_flat(),  # with the overrides; seed and runtime.out are set per run
        "overrides": exp.overrides,
        "grid": exp.grid,
        "variants": exp.variants,
        "seeds": list(seeds),
        "quick": quick,
        "metrics": list(exp.metrics),
        "interval": f"mean and {CI_LEVEL:.0%} Student t interval over seeds (n=1: the value itself)",
        "plot": plot,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    earlier = _earlier_runs(out)
    results: list[RunResult] = []
    _runner.accept_runs()  # an earlier sweep in this process may have been interrupted
    with _Reporter(len(todo)) as reporter, ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        def work(job: Job) -> RunResult:
            reporter.started(job)
            return execute_job(job, runner=runner, code=code, reuse_stale=reuse_stale)

        futures = [pool.submit(work, job) for job in todo]
        try:
            for future in as_completed(futures):
                result = future.result()
                if result.status == "done":  # keep how the kept run was made, from the last experiment.json
                    made = earlier.get((result.job.point.id, result.job.seed, _relative(result.run_dir, out)), {})
                    result.command = shlex.split(made["command"]) if made.get("command") else []
                    result.seconds = float(made.get("seconds") or 0.0)
                results.append(result)
                reporter.finished(result, exp.metrics)
                write_outputs(exp, results, out, meta, final=False)  # cheap, and survives an interrupt
        except BaseException:
            for f in futures:
                f.cancel()
            _runner.stop_running()  # else the pool waits for runs still going, and a SIGTERM orphans them
            raise
    write_outputs(exp, results, out, meta, final=True)
    from ..plots import plot_experiment, plot_frontier

    if plot.get("kind") == "frontier":
        plot_frontier(out / "results.csv", plot, out / "figure.png")
    else:
        plot_experiment(out / "results.csv", plot, out / "figure.png", runs_csv=out / "runs.csv")
    if plot.get("rounds"):
        from ..plots import plot_rounds

        plot_rounds(out / "rounds.csv", plot, out / "figure_rounds.png")
    return results
