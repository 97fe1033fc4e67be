"""``python -m fedgov.experiment FILE``: sweep a grid of configs over several seeds and aggregate.

An experiment file holds one ``[experiment]`` table::

    [experiment]
    name = "heterogeneity"            # output folder name (default: the file's stem)
    description = "..."
    base = "../configs/default.toml"  # relative to THIS file (absolute paths work too)
    seeds = [0, 1, 2]                 # or a count: seeds = 3 means [0, 1, 2]
    metrics = ["final_accuracy", "fairness.worst"]   # dotted paths into summary.json

    [experiment.overrides]            # optional, applied to every run
    "train.rounds" = 20

    [experiment.grid]                 # dotted config keys -> lists; runs their cartesian product
    "data.alpha" = [0.1, 0.5, 1.0, 100.0]

    [experiment.variants]             # optional named override sets, in order (an axis "variant")
    none = {}
    "dp-eps3" = { "privacy.dp" = "sample", "privacy.target_epsilon" = 3.0 }
    he = { "secure.aggregation" = "he" }

With variants the grid is optional; with both, every variant runs at every grid
point. A variant and the grid may not set the same key. Where only some cells of the
product are worth their cost, ``skip`` (in ``[experiment]``) leaves out every point
that matches all keys of one entry; an entry with a ``seed`` key leaves out only those
seeds of the points it matches (a costly cell run with fewer seeds)::

    skip = [{ "governance.weighting" = "samples", "governance.registrar_catch" = [0.5, 1.0] },
            { variant = "10000-turnout100", seed = [1, 2] }]

How the results are drawn::

    [experiment.plot]                 # optional
    x = "data.alpha"                  # a grid key (default: the first)
    series = "strategy.name"          # optional grid key: one line per value
    y = ["final_accuracy"]            # metrics to draw, one panel each (default: all)
    xscale = "log"                    # or "linear"
    ylog = ["bytes_per_round"]        # panels drawn with a log y axis
    title = "..."
    labels = { "data.alpha" = "Dirichlet alpha" }   # display names for keys and metrics
    rounds = ["attack.success_rate_by_round"]        # optional: per-round lists in summary.json,
                                                     # drawn over rounds (rounds.csv, figure_rounds.png)

A ``kind = "frontier"`` plot draws metric against metric, one point per grid point:
``x`` and ``y`` are metrics; ``point`` (a grid key or a list of them) labels each point,
leaving out values the base config already has, and ``point_names`` gives a later key a short
name to write its value as ``name=value``; ``series`` colours it; ``facet`` splits
the panels; ``note`` adds a metric to each label in brackets; ``xscale = "log"``;
``rounds`` as above, and ``rounds_only`` (entries as in ``skip``) draws only the points
matching an entry there; ``rounds_facet`` (grid keys, default ``facet``) splits the learning
curves' panels, two keys with one metric making a grid of them. See ``experiments/dao.toml``
and ``experiments/fedprox_synthetic.toml``.

Every (grid point, seed) runs ``python -m fedgov.simulate`` in its own process, so
each run gets fresh workers. Results go to ``<folder of FILE>/results/<name>/``:
``points/<point>/seed-<s>/`` (the run directories), ``runs.csv``, ``results.csv``
(mean and 95% Student t interval per grid point), ``figure.png`` and
``experiment.json``. Running the same command again skips runs whose
``summary.json`` exists for the same config and was made by the same code (the
same fedgov sources, see :mod:`fedgov.provenance`), continues interrupted runs
of the same config and code from their checkpoint, and starts the rest. A
finished run made by other code is run again, unless ``--reuse-stale``: then it
is kept and marked stale in ``runs.csv``, ``results.csv`` and ``experiment.json``.

The package, by job (imports run down this list, never up):

* :mod:`~fedgov.experiment.spec`: the experiment file (:class:`Experiment`,
  :class:`Point`, :func:`load_experiment`, the grid and variants) and the
  summary.json metrics it may aggregate;
* :mod:`~fedgov.experiment.stats`: confidence intervals (``scipy.stats.t``);
* :mod:`~fedgov.experiment.runner`: jobs, running ``fedgov.simulate``, finding
  finished and resumable runs;
* :mod:`~fedgov.experiment.tables`: runs.csv, results.csv, rounds.csv,
  experiment.json and the printed table;
* :mod:`~fedgov.experiment.sweep`: :func:`run_experiment`, the whole sweep;
* :mod:`~fedgov.experiment.cli`: the command line (``python -m fedgov.experiment``).
"""

from ..provenance import code_version
from .cli import main
from .runner import (
    LAUNCH_FILE,
    Job,
    Runner,
    RunResult,
    build_jobs,
    execute_job,
    find_completed,
    find_resumable,
    subprocess_runner,
)
from .spec import (
    MECHANISM_METRICS,
    QUICK_COOPERATIVES,
    QUICK_ROUNDS,
    RESERVED_KEYS,
    SUMMARY_METRICS,
    VARIANT_AXIS,
    Experiment,
    ExperimentError,
    Point,
    expand_grid,
    load_experiment,
    metric_value,
    point_id,
    series_value,
)
from .stats import CI_LEVEL, Interval, confidence_interval, student_t_quantile
from .sweep import run_experiment
from .tables import print_results, results_table, rounds_table, runs_table, write_outputs

__all__ = [
    "CI_LEVEL",
    "LAUNCH_FILE",
    "MECHANISM_METRICS",
    "QUICK_COOPERATIVES",
    "QUICK_ROUNDS",
    "RESERVED_KEYS",
    "SUMMARY_METRICS",
    "VARIANT_AXIS",
    "Experiment",
    "ExperimentError",
    "Interval",
    "Job",
    "Point",
    "RunResult",
    "Runner",
    "build_jobs",
    "code_version",
    "confidence_interval",
    "execute_job",
    "expand_grid",
    "find_completed",
    "find_resumable",
    "load_experiment",
    "main",
    "metric_value",
    "point_id",
    "print_results",
    "results_table",
    "rounds_table",
    "run_experiment",
    "runs_table",
    "series_value",
    "student_t_quantile",
    "subprocess_runner",
    "write_outputs",
]
