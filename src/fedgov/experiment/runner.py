"""Running an experiment's jobs: one ``python -m fedgov.simulate`` process per (grid point, seed).

:func:`build_jobs` makes the jobs; :func:`execute_job` runs one, unless a finished run of
the same config made by the same code is already in its folder (:func:`find_completed`),
and continues an interrupted run of the same config and code from its checkpoint
(:func:`find_resumable`). Which code made a run is ``summary.json`` ``code``
(:func:`fedgov.provenance.code_version`); "the same code" is
:func:`fedgov.provenance.same_code` (the same source hash). A finished run made by
other code is run again, unless ``reuse_stale``: then it is kept and marked stale.

A checkpoint records no code version, so before starting a fresh run the job writes
``launch.json`` into its folder: the code that starts it and the run directories that
existed before. Only a run directory made after that launch, by the same code, is
continued; any other checkpoint is left alone and the run starts afresh.

:func:`subprocess_runner` keeps every run it starts in a registry, so that an interrupted
sweep can stop them (:func:`stop_running`) rather than leave them running as orphans; after
that, until :func:`accept_runs`, it starts no new one.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load_config
from ..provenance import same_code
from ..results import atomic_write_text, read_json, write_json
from .spec import QUICK_COOPERATIVES, QUICK_ROUNDS, Experiment, Point

__all__ = [
    "LAUNCH_FILE",
    "Job",
    "RunResult",
    "Runner",
    "accept_runs",
    "build_jobs",
    "execute_job",
    "find_completed",
    "find_resumable",
    "stop_running",
    "subprocess_runner",
]

STDERR_TAIL_LINES = 15
LAUNCH_FILE = "launch.json"  # in a job's seed folder: which code started the newest fresh run


@dataclass(frozen=True)
class Job:
    """One (grid point, seed) run of ``fedgov.simulate``."""

    point: Point
    seed: int
    config: Config
    seed_dir: Path  # <out>/points/<point>/seed-<s>/: the config file and the run directory(ies)

    @property
    def config_file(self) -> Path:
        return self.seed_dir / "run.toml"

    def command(self, *, resume: Path | None = None) -> list[str]:
        if resume is not None:  # the run directory's own config.toml is the same config
            return [sys.executable, "-m", "fedgov.simulate", "--resume", str(resume), "--no-progress"]
        return [sys.executable, "-m", "fedgov.simulate", "--config", str(self.config_file),
                "--out", str(self.seed_dir), "--no-progress"]


@dataclass
class RunResult:
    job: Job
    status: str  # "ok" (ran now), "done" (kept from an earlier invocation) or "failed"
    run_dir: Path | None = None
    returncode: int | None = None
    seconds: float = 0.0
    error: str = ""
    command: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    # Made by other code than the experiment's (kept under reuse_stale, or the code changed mid-sweep).
    stale: bool = False
    replaced_stale: bool = False  # ran now although a finished run made by other code was there

    @property
    def succeeded(self) -> bool:
        return self.status in ("ok", "done")

    @property
    def code(self) -> dict[str, Any] | None:
        """The code that made the run, as its summary.json records it."""
        made = (self.summary or {}).get("code")
        return made if isinstance(made, dict) else None


# A runner takes a command and returns (exit status, stdout, stderr); tests swap in a fake one.
Runner = Callable[[list[str]], tuple[int, str, str]]


_running: set[subprocess.Popen[str]] = set()
_running_lock = threading.Lock()
_stopping = False  # set by stop_running, under the lock: a run about to start must not start after it
STOPPED_BEFORE_START = (-15, "", "stopped before it started: the sweep was interrupted")  # as if SIGTERMed


def subprocess_runner(command: list[str]) -> tuple[int, str, str]:
    with _running_lock:
        if _stopping:
            return STOPPED_BEFORE_START
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        _running.add(proc)
    try:
        stdout, stderr = proc.communicate()
    finally:
        with _running_lock:
            _running.discard(proc)
    return proc.returncode, stdout, stderr


def stop_running() -> int:
    """Send SIGTERM to every run :func:`subprocess_runner` still waits on; returns how many.

    Each run stops its own workers (they exit when their server is gone) and keeps its last
    checkpoint, so the next sweep continues it. Until :func:`accept_runs`, no new run starts.
    """
    global _stopping
    with _running_lock:
        _stopping = True
        procs = [p for p in _running if p.poll() is None]
    for proc in procs:
        proc.terminate()
    return len(procs)


def accept_runs() -> None:
    """Let :func:`subprocess_runner` start runs again (a sweep calls it as it starts)."""
    global _stopping
    with _running_lock:
        _stopping = False


def _run_dirs(seed_dir: Path) -> list[Path]:
    if not seed_dir.is_dir():
        return []
    # Run directories are named <UTC time>-<hash>, so the newest sorts last.
    return sorted((p for p in seed_dir.iterdir() if p.is_dir() and (p / "config.toml").is_file()),
                  key=lambda p: p.name)


def _same_config(run_dir: Path, config_hash: str) -> bool:
    # Read the run's config.toml with today's Config rather than trusting the hash in summary.json:
    # keys added to Config since (at their defaults) then still match, changed settings do not.
    try:
        return load_config(run_dir / "config.toml").hash() == config_hash
    except ConfigError:
        return False


def find_completed(seed_dir: Path, config_hash: str, *, code: Mapping[str, Any] | None = None
                   ) -> tuple[Path, dict[str, Any]] | None:
    """The newest run directory under ``seed_dir`` with a summary.json for this config.

    With ``code``, only a run whose summary.json says it was made by that code counts.
    """
    for run_dir in reversed(_run_dirs(seed_dir)):
        path = run_dir / "summary.json"
        if not path.is_file() or not _same_config(run_dir, config_hash):
            continue
        try:
            summary = read_json(path)
        except (OSError, ValueError):
            continue
        if not isinstance(summary, dict):
            continue
        if code is not None and not same_code(summary.get("code"), code):
            continue
        return run_dir, summary
    return None


def _launch(seed_dir: Path) -> dict[str, Any]:
    try:
        launch = read_json(seed_dir / LAUNCH_FILE)
    except (OSError, ValueError):
        return {}
    return launch if isinstance(launch, dict) else {}


def find_resumable(seed_dir: Path, config_hash: str, *, code: Mapping[str, Any] | None = None) -> Path | None:
    """The newest unfinished run directory of this config that has a checkpoint to continue from.

    With ``code``, only one started (per ``launch.json``) by that code: made after the last
    fresh launch, which that code started.
    """
    launch = _launch(seed_dir) if code is not None else {}
    for run_dir in reversed(_run_dirs(seed_dir)):
        if (run_dir / "summary.json").is_file() or not (run_dir / "checkpoint.npz").is_file():
            continue
        if not _same_config(run_dir, config_hash):
            continue
        if code is not None:
            before = launch.get("run_dirs_before")
            if not same_code(launch.get("code"), code) or not isinstance(before, list) or run_dir.name in before:
                continue
        return run_dir
    return None


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def execute_job(job: Job, *, runner: Runner = subprocess_runner, code: Mapping[str, Any] | None = None,
                reuse_stale: bool = False) -> RunResult:
    """Run one job unless its summary.json already exists; never raises for a failed run.

    ``code``: the code running now (``fedgov.provenance.code_version()``). A finished run is
    kept only when made by it; one made by other code is run again, or with ``reuse_stale``
    kept and marked ``stale``. Without ``code`` any finished run of the config is kept.
    """
    config_hash = job.config.hash()
    found = find_completed(job.seed_dir, config_hash, code=code)
    if found is not None:
        run_dir, summary = found
        return RunResult(job=job, status="done", run_dir=run_dir, summary=summary, returncode=0)
    other = find_completed(job.seed_dir, config_hash) if code is not None else None
    if other is not None and reuse_stale:
        run_dir, summary = other
        return RunResult(job=job, status="done", run_dir=run_dir, summary=summary, returncode=0, stale=True)
    atomic_write_text(job.config_file, job.config.to_toml())
    resume = find_resumable(job.seed_dir, config_hash, code=code)
    if resume is None and code is not None:
        write_json(job.seed_dir / LAUNCH_FILE, {"code": dict(code), "started": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run_dirs_before": [p.name for p in _run_dirs(job.seed_dir)]})
    command = job.command(resume=resume)
    start = time.perf_counter()
    try:
        status, stdout, stderr = runner(command)
    except OSError as exc:
        status, stdout, stderr = 127, "", f"could not start {command[0]}: {exc}"
    seconds = time.perf_counter() - start
    atomic_write_text(job.seed_dir / "simulate.log",
                      f"$ {shlex.join(command)}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")
    result = RunResult(job=job, status="failed", returncode=status, seconds=seconds, command=command,
                       replaced_stale=other is not None)
    lines = stdout.strip().splitlines()
    if status != 0:
        result.error = _tail(stderr) or f"exit status {status}"
        return result
    run_dir = Path(lines[-1].strip()) if lines else None
    if run_dir is None or not (run_dir / "summary.json").is_file():
        result.error = f"fedgov.simulate exited 0 but printed no run directory with a summary.json " \
                       f"(last line: {lines[-1] if lines else ''!r})"
        return result
    result.status, result.run_dir = "ok", run_dir
    result.summary = read_json(run_dir / "summary.json")
    # Ran now, so by the code on disk now; if the summary names other code, the sources changed
    # while the sweep ran, and the table must not present the run as the experiment's code.
    made = result.code
    result.stale = code is not None and made is not None and not same_code(made, code)
    return result


def build_jobs(exp: Experiment, out: Path, *, seeds: Sequence[int], quick: bool = False) -> list[Job]:
    """Seed-major order: after the first pass every point has one run, so a partial sweep shows the curve."""
    jobs = []
    for seed in seeds:
        for point in exp.points:
            if seed in point.skipped_seeds:
                continue
            seed_dir = out / "points" / point.id / f"seed-{seed}"
            cfg = exp.config_for(point).replace(seed=seed)
            if quick:  # shrink, never grow, whatever the grid says
                shrink: dict[str, Any] = {"train.rounds": min(cfg.train.rounds, QUICK_ROUNDS)}
                if cfg.data.partition != "natural":
                    shrink["data.num_cooperatives"] = min(cfg.data.num_cooperatives, QUICK_COOPERATIVES)
                cfg = cfg.replace(**shrink)
            jobs.append(Job(point=point, seed=seed, config=cfg.replace(**{"runtime.out": str(seed_dir)}),
                            seed_dir=seed_dir))
    return jobs
