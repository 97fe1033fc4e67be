import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedgov import experiment as ex
from fedgov.config import Config, load_config
from fedgov.experiment import (
    ExperimentError,
    confidence_interval,
    expand_grid,
    load_experiment,
    metric_value,
    run_experiment,
    student_t_quantile,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.toml"


def write_experiment(tmp_path: Path, body: str, *, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


TINY = f"""
[experiment]
name = "tiny"
description = "two points, one seed"
base = "{DEFAULT.as_posix()}"
seeds = [0]
metrics = ["final_accuracy", "fairness.worst"]

[experiment.overrides]
"train.rounds" = 2
"data.num_cooperatives" = 3

[experiment.grid]
"data.alpha" = [0.5, 100]

[experiment.plot]
x = "data.alpha"
xscale = "log"
"""


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---- statistics --------------------------------------------------------------------------

@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706),
                                          (10, 2.2281), (30, 2.0423), (1000, 1.9623)])
def test_t_quantile_known_values(df, expected):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert student_t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_confidence_interval_of_one_two_three():
    ci = confidence_interval([1.0, 2.0, 3.0])
    half = 4.302652729749464 * 1.0 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n), s = 1
    assert ci.n == 3 and ci.mean == pytest.approx(2.0) and ci.std == pytest.approx(1.0)
    assert ci.low == pytest.approx(2.0 - half, abs=1e-9)
    assert ci.high == pytest.approx(2.0 + half, abs=1e-9)


def test_confidence_interval_pins_a_known_value():
    # 10, 12, 17: mean 13, s^2 = (9 + 1 + 16) / 2 = 13; t(0.975, 2) = 4.302652729749464 (tables: 4.3027)
    ci = confidence_interval([10.0, 12.0, 17.0])
    assert (ci.n, ci.mean, ci.std) == (3, 13.0, pytest.approx(math.sqrt(13)))
    assert ci.low == pytest.approx(13.0 - 8.956685895029603, abs=1e-9)
    assert ci.high == pytest.approx(13.0 + 8.956685895029603, abs=1e-9)
    assert ci.half_width == pytest.approx(8.956685895029603, abs=1e-9)
    # 90%: t(0.95, 2) = 2.919985580355516 (tables: 2.9200)
    assert confidence_interval([10.0, 12.0, 17.0], level=0.90).half_width == pytest.approx(
        2.919985580355516 * math.sqrt(13) / math.sqrt(3), abs=1e-9)


def test_the_t_distribution_comes_from_scipy(monkeypatch):
    import scipy.stats

    monkeypatch.setattr(scipy.stats.t, "ppf", lambda q, df: 100.0 * q + df)
    assert student_t_quantile(0.975, 2) == pytest.approx(99.5)
    assert confidence_interval([1.0, 2.0, 3.0]).high == pytest.approx(2.0 + 99.5 / math.sqrt(3))
    monkeypatch.undo()
    with pytest.raises(ValueError):
        student_t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        student_t_quantile(0.5, 0)


def test_confidence_interval_edge_cases():
    one = confidence_interval([0.7])
    assert (one.n, one.mean, one.low, one.high) == (1, 0.7, 0.7, 0.7)  # the point itself
    assert confidence_interval([]).n == 0 and math.isnan(confidence_interval([]).mean)
    assert confidence_interval([1.0, None, float("nan"), 3.0]).n == 2  # missing values are not zeros
    same = confidence_interval([0.5, 0.5, 0.5])
    assert same.low == same.high == 0.5


# ---- the experiment file --------------------------------------------------------------------

def test_expand_grid_is_the_cartesian_product_in_file_order():
    points = expand_grid({"data.alpha": [0.1, 1.0], "strategy.name": ["fedavg", "fedprox", "median"]})
    assert len(points) == 6
    assert points[0] == {"data.alpha": 0.1, "strategy.name": "fedavg"}
    assert points[1] == {"data.alpha": 0.1, "strategy.name": "fedprox"}
    assert points[-1] == {"data.alpha": 1.0, "strategy.name": "median"}
    assert expand_grid({}) == [{}]


def test_point_ids_are_readable_and_safe():
    assert ex.point_id({"data.alpha": 0.1, "strategy.name": "fedprox"}) == "data.alpha=0.1__strategy.name=fedprox"
    assert ex.point_id({"train.rounds": 5, "data.alpha": 100.0}) == "train.rounds=5__data.alpha=100.0"
    odd = ex.point_id({"data.path": "../data/a b.csv"})
    assert "/" not in odd and " " not in odd and odd != ex.point_id({"data.path": "../data/a_b.csv"})


def test_load_experiment_resolves_base_and_normalizes_values(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, TINY))
    assert exp.base.train.rounds == 2 and exp.base.data.num_cooperatives == 3
    assert exp.grid == {"data.alpha": [0.5, 100.0]}  # int 100 -> float, as the Config holds it
    assert [p.id for p in exp.points] == ["data.alpha=0.5", "data.alpha=100.0"]
    assert exp.plot["x"] == "data.alpha" and exp.plot["y"] == ["final_accuracy", "fairness.worst"]
    assert exp.default_out() == tmp_path / "results" / "tiny"


def test_shipped_experiments_load():
    for path in sorted((ROOT / "experiments").glob("*.toml")):
        exp = load_experiment(path)
        assert exp.points and exp.seeds
    het = load_experiment(ROOT / "experiments" / "heterogeneity.toml")
    assert het.grid == {"data.alpha": [0.1, 0.5, 1.0, 100.0]} and het.seeds == (0, 1, 2)
    assert het.base_path.resolve() == DEFAULT.resolve()
    assert het.plot["xscale"] == "log"


def test_bare_dotted_keys_and_seed_count(tmp_path):
    body = TINY.replace('"data.alpha" = [0.5, 100]', "data.alpha = [0.5]\nstrategy.name = ['fedavg', 'fedprox']")
    body = body.replace("seeds = [0]", "seeds = 2").replace('x = "data.alpha"', 'x = "strategy.name"')
    body = body.replace('xscale = "log"', 'series = "data.alpha"')
    exp = load_experiment(write_experiment(tmp_path, body))
    assert list(exp.grid) == ["data.alpha", "strategy.name"] and exp.seeds == (0, 1)
    assert exp.points[1].id == "data.alpha=0.5__strategy.name=fedprox"


VARIANTS = TINY.replace("""[experiment.grid]
"data.alpha" = [0.5, 100]

[experiment.plot]
x = "data.alpha"
xscale = "log"
""", """[experiment.variants]
none = {}
"dp-eps3" = { "privacy.dp" = "sample", "privacy.target_epsilon" = 3 }
he = { secure.aggregation = "he" }

[experiment.plot]
y = ["final_accuracy"]
""")


def test_named_variants_are_one_axis_in_file_order(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, VARIANTS))
    assert exp.grid == {} and list(exp.variants) == ["none", "dp-eps3", "he"]
    assert exp.axes == {"variant": ["none", "dp-eps3", "he"]}
    assert [p.id for p in exp.points] == ["variant=none", "variant=dp-eps3", "variant=he"]
    configs = [exp.config_for(p) for p in exp.points]
    assert [(c.privacy.dp, c.privacy.target_epsilon, c.secure.aggregation) for c in configs] == [
        ("off", 0.0, "off"), ("sample", 3.0, "off"), ("off", 0.0, "he")]
    assert all(c.train.rounds == 2 for c in configs)  # the overrides still apply
    assert exp.plot["x"] == "variant"


def test_variants_times_grid_and_their_runs(tmp_path):
    body = VARIANTS.replace("[experiment.variants]", '[experiment.grid]\n"data.alpha" = [0.5, 100]\n\n'
                                                     "[experiment.variants]")
    body = body.replace('y = ["final_accuracy"]', 'x = "data.alpha"\nseries = "variant"')
    exp = load_experiment(write_experiment(tmp_path, body))
    assert len(exp.points) == 6 and exp.points[1].values == {"variant": "none", "data.alpha": 100.0}
    out = tmp_path / "out"
    fake = FakeSimulate()
    run_experiment(exp, out=out, runner=fake)
    rows = read_csv(out / "results.csv")
    assert [(r["variant"], r["data.alpha"]) for r in rows][:3] == [("none", "0.5"), ("none", "100.0"),
                                                                   ("dp-eps3", "0.5")]
    ran = [load_config(Path(c[c.index("--config") + 1])) for c in fake.commands]
    assert sorted((c.privacy.dp, c.secure.aggregation) for c in ran) == sorted(
        [("off", "off")] * 2 + [("sample", "off")] * 2 + [("off", "he")] * 2)
    assert json.loads((out / "experiment.json").read_text())["variants"]["he"] == {"secure.aggregation": "he"}
    assert (out / "figure.png").is_file()


@pytest.mark.parametrize("edit, fragment", [
    (("none = {}", 'none = { "privacy.dp" = "maybe" }'), "experiment.variants.none: privacy.dp"),
    (("none = {}", 'none = { "seed" = 3 }'), "experiment.variants.none.seed: set by the experiment"),
    (("none = {}", '"no ne" = {}'), "a variant name must be"),
    (("none = {}", 'none = {}\nbad = { "strategy.name" = "median", "secure.aggregation" = "he" }'),
     "experiment.variants.bad"),
    (('y = ["final_accuracy"]', 'y = ["final_accuracy"]\nylog = ["bytes_per_round"]'), "experiment.plot.ylog"),
])
def test_variant_errors_name_the_variant(tmp_path, edit, fragment):
    old, new = edit
    assert old in VARIANTS
    path = write_experiment(tmp_path, VARIANTS.replace(old, new))
    with pytest.raises(ExperimentError) as info:
        load_experiment(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_key_in_both_grid_and_a_variant_is_refused(tmp_path):
    body = VARIANTS.replace("[experiment.variants]", '[experiment.grid]\n"secure.aggregation" = ["off", "he"]\n\n'
                                                     "[experiment.variants]")
    with pytest.raises(ExperimentError, match="secure.aggregation: also set by variant 'he'"):
        load_experiment(write_experiment(tmp_path, body))


@pytest.mark.parametrize("edit, fragment", [
    (('"data.alpha" = [0.5, 100]', '"data.alpah" = [0.5]'), "experiment.grid: data.alpah: unknown key"),
    (('"data.alpha" = [0.5, 100]', '"data.alpha" = [0.5, 0]'), "data.alpha: 0"),
    (('"data.alpha" = [0.5, 100]', '"model.name" = ["mlp", "transformer"]'), "model.name: 'transformer'"),
    (('"data.alpha" = [0.5, 100]', '"data.alpha" = 0.5'), "experiment.grid.data.alpha: expected a non-empty list"),
    (('"data.alpha" = [0.5, 100]', '"seed" = [1, 2]'), "experiment.grid.seed: set by the experiment"),
    (('seeds = [0]', 'seeds = [0, -1]'), "experiment.seeds"),
    (('name = "tiny"', 'nmae = "tiny"'), "experiment.nmae: unknown key"),
    (('"final_accuracy", "fairness.worst"', '"final_acc"'), "experiment.metrics: 'final_acc'"),
    (('"train.rounds" = 2', '"train.rounds" = 0'), "experiment.overrides: train.rounds"),
    (('xscale = "log"', 'xscale = "loglog"'), "experiment.plot.xscale"),
    (('x = "data.alpha"', 'x = "data.beta"'), "experiment.plot.x: 'data.beta'"),
    (('x = "data.alpha"', 'x = "data.alpha"\ncolour = "red"'), "experiment.plot.colour: unknown key"),
    ((f'base = "{DEFAULT.as_posix()}"', 'base = "nope.toml"'), "nope.toml: no such config file"),
])
def test_validation_errors_are_one_line_naming_file_and_key(tmp_path, edit, fragment):
    old, new = edit
    assert old in TINY
    path = write_experiment(tmp_path, TINY.replace(old, new))
    with pytest.raises(ExperimentError) as info:
        load_experiment(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_cli_unknown_grid_key_exits_2_without_traceback(tmp_path):
    path = write_experiment(tmp_path, TINY.replace('"data.alpha" = [0.5, 100]', '"data.no_such_key" = [1, 2]'))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fedgov.experiment", str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "data.no_such_key" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()  # nothing was started


# ---- running, with a fake simulate (no Flower) -------------------------------------------------

# The code the tests pretend is running (fedgov.experiment.sweep.code_version is patched to it, so
# edits to the sources while the tests run change nothing), and a different one.
CODE = {"git_commit": "a" * 40, "git_dirty": False, "fedgov_version": "0.1.0", "source_hash": "1" * 64}
OTHER_CODE = {"git_commit": "b" * 40, "git_dirty": False, "fedgov_version": "0.1.0", "source_hash": "2" * 64}
GIT_COMMIT = re.compile(r'"git_commit": "([0-9a-f]{40})"')  # what the before-stop check greps


@pytest.fixture(autouse=True)
def current_code(monkeypatch):
    monkeypatch.setattr("fedgov.experiment.sweep.code_version", lambda: dict(CODE))
    return CODE


class FakeSimulate:
    """Stands in for ``python -m fedgov.simulate``: writes a summary.json and prints the run dir.

    ``code``: what the summary records as the code that made it (None: no ``code`` key);
    ``interrupt_alpha``: for that alpha, leave a checkpoint and no summary, as an interrupted run.
    """

    def __init__(self, *, fail_alpha: float | None = None, interrupt_alpha: float | None = None,
                 code: dict | None = CODE) -> None:
        self.commands: list[list[str]] = []
        self.fail_alpha = fail_alpha
        self.interrupt_alpha = interrupt_alpha
        self.code = code

    def __call__(self, command: list[str]) -> tuple[int, str, str]:
        self.commands.append(command)
        if "--resume" in command:
            run_dir = Path(command[command.index("--resume") + 1])
            cfg = load_config(run_dir / "config.toml")
        else:
            cfg = load_config(Path(command[command.index("--config") + 1]))
            out = Path(command[command.index("--out") + 1])
            run_dir = out / f"20990101-{len(list(out.glob('2099*'))):06d}-{cfg.hash()[:8]}"  # newer each time
            run_dir.mkdir(parents=True)
            (run_dir / "config.toml").write_text(cfg.to_toml())
        if cfg.data.alpha == self.fail_alpha:
            return 1, "", "Ray started\nTraceback (most recent call last):\nValueError: boom\n"
        if cfg.data.alpha == self.interrupt_alpha:
            (run_dir / "checkpoint.npz").write_bytes(b"")
            return 130, "", f"interrupted; resume with: python -m fedgov.simulate --resume {run_dir}\n"
        acc = 0.5 + 0.1 * cfg.seed + cfg.data.alpha / 1000
        summary = {"config_hash": cfg.hash(), "seed": cfg.seed, "final_accuracy": acc,
                   "fairness": {"worst": acc - 0.2},
                   "attack": {"success_rate_by_round": [0.1 * cfg.seed, 0.2 * cfg.seed, None]}}
        if self.code is not None:
            summary["code"] = self.code
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return 0, f"a table\n{run_dir}\n", ""


def premade_run(job: ex.Job, *, accuracy: float, config: Config | None = None,
                summary: bool = True, code: dict | None = CODE, name: str = "20000101-000000") -> Path:
    """A finished run (or, without ``summary``, an interrupted one) as an earlier invocation left it;
    ``code=None``: a summary from before fedgov recorded the code."""
    cfg = config or job.config
    run_dir = job.seed_dir / f"{name}-{cfg.hash()[:8]}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    if summary:
        made = {"config_hash": cfg.hash(), "final_accuracy": accuracy, "fairness": {"worst": accuracy}}
        if code is not None:
            made["code"] = code
        (run_dir / "summary.json").write_text(json.dumps(made))
    else:
        (run_dir / "checkpoint.npz").write_bytes(b"")
    return run_dir


def test_run_with_fake_simulate_writes_tables_and_figure(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, TINY.replace("seeds = [0]", "seeds = [0, 1, 2]")))
    out = tmp_path / "out"
    fake = FakeSimulate()
    results = run_experiment(exp, out=out, runner=fake)
    assert len(fake.commands) == 6 and all(r.status == "ok" for r in results)
    command = fake.commands[0]
    assert command[1:3] == ["-m", "fedgov.simulate"] and "--no-progress" in command
    runs = read_csv(out / "runs.csv")
    assert len(runs) == 6 and {r["status"] for r in runs} == {"ok"}
    assert runs[0]["run_dir"].startswith("points/data.alpha=0.5/seed-0/")
    rows = read_csv(out / "results.csv")
    assert [r["data.alpha"] for r in rows] == ["0.5", "100.0"]
    row = rows[0]
    assert row["n"] == "3" and row["failed"] == "0"
    mean = 0.6 + 0.5 / 1000  # seeds 0, 1, 2 -> 0.5, 0.6, 0.7 (+ alpha / 1000)
    half = student_t_quantile(0.975, 2) * 0.1 / math.sqrt(3)
    assert float(row["final_accuracy_mean"]) == pytest.approx(mean)
    assert float(row["final_accuracy_ci95_low"]) == pytest.approx(mean - half)
    assert float(row["fairness.worst_ci95_high"]) == pytest.approx(mean - 0.2 + half)
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "experiment.json").read_text())
    assert meta["finished"] and len(meta["runs"]) == 6 and "fedgov.simulate" in meta["runs"][0]["command"]
    assert meta["plot"]["x"] == "data.alpha" and meta["experiment_toml"] == exp.text


def test_variants_with_a_grid_keep_the_experiment_name(tmp_path):
    text = TINY + '\n[experiment.variants]\nfirst = {}\nlast = { "train.lr" = 0.1 }\n'
    exp = load_experiment(write_experiment(tmp_path, text.replace('x = "data.alpha"', 'x = "variant"\nseries = "data.alpha"').replace('xscale = "log"', '')))
    assert exp.name == "tiny"
    assert len(exp.points) == 4


def test_per_round_series_are_saved_and_drawn(tmp_path):
    text = TINY.replace("seeds = [0]", "seeds = [0, 1, 2]").replace(
        'xscale = "log"', 'xscale = "log"\nrounds = ["attack.success_rate_by_round"]')
    exp = load_experiment(write_experiment(tmp_path, text))
    out = tmp_path / "out"
    run_experiment(exp, out=out, runner=FakeSimulate())
    rows = [r for r in read_csv(out / "rounds.csv") if r["data.alpha"] == "0.5"]
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    assert float(rows[0]["mean"]) == pytest.approx(0.1) and rows[0]["n"] == "3"  # seeds 0, 1, 2
    assert float(rows[1]["mean"]) == pytest.approx(0.2)
    assert rows[2]["n"] == "0"  # no value in that round: nothing is made up
    assert (out / "figure_rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_runs_whose_summary_exists(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, TINY))
    out = tmp_path / "out"
    jobs = ex.build_jobs(exp, out, seeds=exp.seeds)
    kept = premade_run(jobs[0], accuracy=0.123)
    # A summary of a different config (e.g. the base file changed since) must not be reused.
    premade_run(jobs[1], accuracy=0.999, config=jobs[1].config.replace(**{"train.lr": 0.5}))
    fake = FakeSimulate()
    results = run_experiment(exp, out=out, runner=fake)
    assert len(fake.commands) == 1
    assert "data.alpha=100.0" in fake.commands[0][fake.commands[0].index("--config") + 1]
    status = {r.job.point.id: r.status for r in results}
    assert status == {"data.alpha=0.5": "done", "data.alpha=100.0": "ok"}
    runs = {r["point"]: r for r in read_csv(out / "runs.csv")}
    assert float(runs["data.alpha=0.5"]["final_accuracy"]) == 0.123
    assert runs["data.alpha=0.5"]["run_dir"] == str(kept.relative_to(out))
    assert float(runs["data.alpha=100.0"]["final_accuracy"]) != 0.999
    # Everything is done now: a second invocation runs nothing.
    again = FakeSimulate()
    run_experiment(exp, out=out, runner=again)
    assert again.commands == []
    recorded = {r["point"]: r for r in json.loads((out / "experiment.json").read_text())["runs"]}
    assert all(r["status"] == "done" for r in recorded.values())
    assert "fedgov.simulate" in recorded["data.alpha=100.0"]["command"]  # carried over from the run that made it


def distinct_commits(path: Path) -> set[str]:
    return set(GIT_COMMIT.findall(path.read_text()))


def test_a_run_made_by_other_code_is_run_again(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, TINY))
    out = tmp_path / "out"
    jobs = ex.build_jobs(exp, out, seeds=exp.seeds)
    old = premade_run(jobs[0], accuracy=0.123, code=OTHER_CODE)
    premade_run(jobs[1], accuracy=0.456, code=None)  # from before summaries recorded the code
    fake = FakeSimulate()
    results = run_experiment(exp, out=out, runner=fake)
    assert len(fake.commands) == 2  # both are run again
    assert all(r.status == "ok" and not r.stale and r.replaced_stale for r in results)
    runs = {r["point"]: r for r in read_csv(out / "runs.csv")}
    assert runs["data.alpha=0.5"]["run_dir"] != str(old.relative_to(out))
    assert float(runs["data.alpha=0.5"]["final_accuracy"]) != 0.123
    assert {r["stale"] for r in runs.values()} == {"false"} and {r["made_by"] for r in runs.values()} == {""}
    assert {r["stale"] for r in read_csv(out / "results.csv")} == {"0"}
    meta = json.loads((out / "experiment.json").read_text())
    assert meta["code"] == CODE and meta["stale_runs"] == 0 and not meta["reuse_stale"]
    assert distinct_commits(out / "experiment.json") == {CODE["git_commit"]}  # one code version named
    # And now that the same code made them, a second invocation keeps them all.
    again = FakeSimulate()
    run_experiment(exp, out=out, runner=again)
    assert again.commands == []


def test_the_same_sources_are_the_same_code_whatever_the_commit(tmp_path):
    # A run made from a dirty tree whose sources were then committed unchanged, or before a commit
    # that changed only results or docs: same source hash, so the same code, and kept.
    exp = load_experiment(write_experiment(tmp_path, TINY))
    out = tmp_path / "out"
    jobs = ex.build_jobs(exp, out, seeds=exp.seeds)
    earlier = {**CODE, "git_commit": "c" * 40, "git_dirty": True}
    for job in jobs:
        premade_run(job, accuracy=0.3, code=earlier)
    fake = FakeSimulate()
    results = run_experiment(exp, out=out, runner=fake)
    assert fake.commands == [] and all(r.status == "done" and not r.stale for r in results)
    assert distinct_commits(out / "experiment.json") == {CODE["git_commit"]}  # the runs' own is not repeated


def test_reuse_stale_keeps_other_codes_runs_and_marks_them(tmp_path, monkeypatch, capsys):
    path = write_experiment(tmp_path, TINY.replace("seeds = [0]", "seeds = [0, 1]"))
    exp = load_experiment(path)
    out = tmp_path / "out"
    jobs = {(j.point.id, j.seed): j for j in ex.build_jobs(exp, out, seeds=exp.seeds)}
    premade_run(jobs["data.alpha=0.5", 0], accuracy=0.123, code=OTHER_CODE)
    premade_run(jobs["data.alpha=0.5", 1], accuracy=0.2, code=CODE)
    premade_run(jobs["data.alpha=100.0", 0], accuracy=0.4, code=None)
    fake = FakeSimulate()
    monkeypatch.setattr("fedgov.experiment.runner.subprocess_runner", fake)
    assert ex.main([str(path), "--out", str(out), "--reuse-stale"]) == 0
    assert len(fake.commands) == 1  # only (alpha 100, seed 1) had no finished run at all
    err = capsys.readouterr().err
    assert "kept STALE" in err and "2 of 4 runs were made by other code" in err
    runs = {(r["point"], r["seed"]): r for r in read_csv(out / "runs.csv")}
    assert runs["data.alpha=0.5", "0"]["stale"] == "true"
    assert runs["data.alpha=0.5", "0"]["made_by"] == f"git {'b' * 12}, source {'2' * 12}"
    assert float(runs["data.alpha=0.5", "0"]["final_accuracy"]) == 0.123  # kept, not rerun
    assert runs["data.alpha=100.0", "0"]["stale"] == "true"
    assert runs["data.alpha=100.0", "0"]["made_by"] == "unknown (not recorded)"
    assert runs["data.alpha=0.5", "1"]["stale"] == runs["data.alpha=100.0", "1"]["stale"] == "false"
    rows = {r["point"]: r for r in read_csv(out / "results.csv")}
    assert rows["data.alpha=0.5"]["stale"] == "1" and rows["data.alpha=100.0"]["stale"] == "1"
    assert "1 of 2 runs made by other code" in rows["data.alpha=0.5"]["note"]
    meta = json.loads((out / "experiment.json").read_text())
    assert meta["reuse_stale"] and meta["stale_runs"] == 2 and meta["code"] == CODE
    recorded = {(r["point"], r["seed"]): r for r in meta["runs"]}
    assert recorded["data.alpha=0.5", 0]["stale"] is True and recorded["data.alpha=0.5", 0]["code"] == OTHER_CODE
    assert recorded["data.alpha=100.0", 0]["stale"] is True and recorded["data.alpha=100.0", 0]["code"] is None
    assert recorded["data.alpha=0.5", 1]["stale"] is False and "code" not in recorded["data.alpha=0.5", 1]
    assert distinct_commits(out / "experiment.json") == {CODE["git_commit"], OTHER_CODE["git_commit"]}
    # Without --reuse-stale the stale runs are run again, and the folder names one code again.
    again = FakeSimulate()
    monkeypatch.setattr("fedgov.experiment.runner.subprocess_runner", again)
    assert ex.main([str(path), "--out", str(out)]) == 0
    assert len(again.commands) == 2
    assert json.loads((out / "experiment.json").read_text())["stale_runs"] == 0
    assert distinct_commits(out / "experiment.json") == {CODE["git_commit"]}


def test_a_run_whose_sources_changed_during_the_sweep_is_marked_stale(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, TINY))
    out = tmp_path / "out"
    results = run_experiment(exp, out=out, runner=FakeSimulate(code=OTHER_CODE))
    assert all(r.status == "ok" and r.stale for r in results)
    assert {r["stale"] for r in read_csv(out / "results.csv")} == {"1"}


def test_a_run_from_before_a_config_key_was_added_still_counts(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, TINY))
    out = tmp_path / "out"
    jobs = ex.build_jobs(exp, out, seeds=exp.seeds)
    run_dir = premade_run(jobs[0], accuracy=0.5)
    text = (run_dir / "config.toml").read_text()
    # An older fedgov wrote no [model] table; today's defaults fill it in, so it is the same config.
    start = text.index("[model]")
    (run_dir / "config.toml").write_text(text[:start] + text[text.index("[train]"):])
    assert ex.find_completed(jobs[0].seed_dir, jobs[0].config.hash()) is not None
    assert ex.find_completed(jobs[0].seed_dir, jobs[0].config.replace(**{"model.hidden": 8}).hash()) is None


def test_interrupted_run_is_continued_from_its_checkpoint(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, TINY))
    out = tmp_path / "out"
    first = FakeSimulate(interrupt_alpha=0.5)
    run_experiment(exp, out=out, runner=first)
    partial = next((out / "points" / "data.alpha=0.5" / "seed-0").glob("2099*"))
    assert (partial / "checkpoint.npz").is_file() and not (partial / "summary.json").exists()
    fake = FakeSimulate()
    run_experiment(exp, out=out, runner=fake)
    resumed = [c for c in fake.commands if "--resume" in c]
    assert len(resumed) == 1 and resumed[0][resumed[0].index("--resume") + 1] == str(partial)
    assert len(fake.commands) == 1  # the other point finished the first time


def test_a_checkpoint_left_by_other_code_is_not_continued(tmp_path, monkeypatch):
    exp = load_experiment(write_experiment(tmp_path, TINY))
    out = tmp_path / "out"
    run_experiment(exp, out=out, runner=FakeSimulate(interrupt_alpha=0.5))
    seed_dir = out / "points" / "data.alpha=0.5" / "seed-0"
    partial = next(seed_dir.glob("2099*"))
    # The sources changed since: continuing would make one run of two codes. It starts afresh.
    monkeypatch.setattr("fedgov.experiment.sweep.code_version", lambda: dict(OTHER_CODE))
    fake = FakeSimulate(code=OTHER_CODE)
    results = run_experiment(exp, out=out, runner=fake)
    assert not any("--resume" in c for c in fake.commands)
    redone = {r.job.point.id: r for r in results}["data.alpha=0.5"]
    assert redone.status == "ok" and redone.run_dir != partial and not redone.stale
    # A checkpoint from before fedgov wrote launch.json (no record of its code) is not continued either.
    (seed_dir / "launch.json").unlink()
    for run_dir in seed_dir.glob("2099*"):
        (run_dir / "summary.json").unlink(missing_ok=True)
        (run_dir / "checkpoint.npz").write_bytes(b"")
    fake = FakeSimulate(code=OTHER_CODE)
    run_experiment(exp, out=out, runner=fake)
    assert [c for c in fake.commands if "--resume" in c] == [] and len(fake.commands) == 1


def test_an_older_checkpoint_is_not_continued_after_a_later_launch(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, TINY))
    out = tmp_path / "out"
    jobs = ex.build_jobs(exp, out, seeds=exp.seeds)
    old = premade_run(jobs[0], accuracy=0.0, summary=False)  # made before the launch below
    (jobs[0].seed_dir / "launch.json").write_text(json.dumps(
        {"code": CODE, "run_dirs_before": [old.name]}))  # that launch made no run directory
    assert ex.find_resumable(jobs[0].seed_dir, jobs[0].config.hash(), code=CODE) is None
    assert ex.find_resumable(jobs[0].seed_dir, jobs[0].config.hash()) == old  # without a code check


def test_failed_run_is_recorded_and_the_rest_goes_on(tmp_path, monkeypatch, capsys):
    path = write_experiment(tmp_path, TINY)
    out = tmp_path / "out"
    monkeypatch.setattr("fedgov.experiment.runner.subprocess_runner", FakeSimulate(fail_alpha=0.5))
    code = ex.main([str(path), "--out", str(out)])
    assert code == 1
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(out)
    assert "1 of 2 runs failed" in captured.err
    runs = {r["point"]: r for r in read_csv(out / "runs.csv")}
    assert runs["data.alpha=0.5"]["status"] == "failed"
    assert "ValueError: boom" in runs["data.alpha=0.5"]["error"]
    assert runs["data.alpha=100.0"]["status"] == "ok"
    rows = {r["point"]: r for r in read_csv(out / "results.csv")}
    assert rows["data.alpha=0.5"]["n"] == "0" and rows["data.alpha=0.5"]["failed"] == "1"
    assert rows["data.alpha=100.0"]["n"] == "1"
    assert rows["data.alpha=100.0"]["final_accuracy_ci95_low"] == rows["data.alpha=100.0"]["final_accuracy_mean"]
    assert "n=1" in rows["data.alpha=100.0"]["note"]
    log = next((out / "points" / "data.alpha=0.5" / "seed-0").glob("simulate.log")).read_text()
    assert "ValueError: boom" in log


def test_quick_shrinks_runs_and_uses_one_seed(tmp_path, monkeypatch, capsys):
    body = TINY.replace("seeds = [0]", "seeds = [4, 5]").replace('"train.rounds" = 2', '"train.rounds" = 30')
    body = body.replace('"data.num_cooperatives" = 3', '"data.num_cooperatives" = 8')
    path = write_experiment(tmp_path, body)
    fake = FakeSimulate()
    monkeypatch.setattr("fedgov.experiment.runner.subprocess_runner", fake)
    assert ex.main([str(path), "--quick"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "results" / "tiny-quick")
    configs = [load_config(Path(c[c.index("--config") + 1])) for c in fake.commands]
    assert len(configs) == 2
    assert all(c.train.rounds == 2 and c.data.num_cooperatives == 3 and c.seed == 4 for c in configs)


def test_summary_metrics_exist_in_a_real_summary(tmp_path):
    from fedgov.run_record import RunRecord

    record = RunRecord(tmp_path, Config(), cooperatives={0: {"id": 0, "num_examples": 5}},
                       num_parameters=10, device="cpu")
    summary = record.summary(wall_seconds=1.0)
    for metric in ex.SUMMARY_METRICS:
        node = summary
        for part in metric.split("."):
            assert part in node, metric
            node = node[part]
    code = summary["code"]  # which code made the run, for fedgov.experiment to compare
    assert re.fullmatch(r"[0-9a-f]{64}", code["source_hash"]) and code["fedgov_version"]
    assert code["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", code["git_commit"])
    assert metric_value({"fairness": {"worst": 0.5}}, "fairness.worst") == 0.5
    assert metric_value({"fairness": {"worst": None}}, "fairness.worst") is None


# ---- end to end, with Flower ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_end_to_end_tiny_experiment(tmp_path):
    path = write_experiment(tmp_path, TINY)
    out = tmp_path / "out"
    # Two runs side by side, each with its own Ray: also covers --jobs, and halves the wait.
    command = [sys.executable, "-m", "fedgov.experiment", str(path), "--out", str(out), "--jobs", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    runs = read_csv(out / "runs.csv")
    assert len(runs) == 2 and all(r["status"] == "ok" for r in runs)
    for r in runs:
        assert 0.0 < float(r["final_accuracy"]) <= 1.0 and math.isfinite(float(r["fairness.worst"]))
        summary = json.loads((out / r["run_dir"] / "summary.json").read_text())
        assert summary["rounds"] == 2 and len(summary["cooperatives"]) == 3
        assert all(metric_value(summary, m) is not None for m in ex.SUMMARY_METRICS)
    rows = read_csv(out / "results.csv")
    assert [r["data.alpha"] for r in rows] == ["0.5", "100.0"]
    for row in rows:
        assert row["n"] == "1"
        for m in ("final_accuracy", "fairness.worst"):
            assert math.isfinite(float(row[f"{m}_mean"]))
            assert row[f"{m}_ci95_low"] == row[f"{m}_mean"] == row[f"{m}_ci95_high"]
    assert (out / "figure.png").stat().st_size > 10_000
    # Each run recorded the code that made it, the experiment's: one code version in the folder.
    meta = json.loads((out / "experiment.json").read_text())
    from fedgov.provenance import same_code

    for r in runs:
        assert same_code(json.loads((out / r["run_dir"] / "summary.json").read_text())["code"], meta["code"])
    assert meta["stale_runs"] == 0 and len(GIT_COMMIT.findall((out / "experiment.json").read_text())) <= 1
    # Running it again finds every summary.json and starts no federation.
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "kept (summary.json exists, same code)" in again.stderr
    assert read_csv(out / "results.csv") == rows


FRONTIER = TINY.replace('"data.alpha" = [0.5, 100]', '"data.alpha" = [0.5, 100]\n"train.lr" = [0.05, 0.1, 0.2]').replace(
    'x = "data.alpha"\nxscale = "log"',
    'kind = "frontier"\nx = "fairness.worst"\ny = ["final_accuracy"]\npoint = "train.lr"\nfacet = "data.alpha"\n'
    'note = "final_accuracy"\nrounds = ["attack.success_rate_by_round"]\nxscale = "log"\n'
    'rounds_only = [{ "train.lr" = [0.05, 0.2] }]')


def test_skip_leaves_out_the_points_it_matches_and_a_frontier_draws_notes_and_rounds(tmp_path):
    body = FRONTIER.replace('metrics = ["final_accuracy", "fairness.worst"]',
                            'metrics = ["final_accuracy", "fairness.worst"]\n'
                            'skip = [{ "data.alpha" = 100, "train.lr" = [0.1, 0.2] }]')
    exp = load_experiment(write_experiment(tmp_path, body))
    assert [(p.values["data.alpha"], p.values["train.lr"]) for p in exp.points] == [
        (0.5, 0.05), (0.5, 0.1), (0.5, 0.2), (100.0, 0.05)]
    out = tmp_path / "out"
    fake = FakeSimulate()
    run_experiment(exp, out=out, runner=fake)
    assert len(fake.commands) == 4
    assert len(read_csv(out / "results.csv")) == 4
    assert (out / "figure.png").is_file() and (out / "figure_rounds.png").is_file()
    assert exp.plot["rounds_only"] == [{"train.lr": [0.05, 0.2]}]
    assert exp.plot["rounds_facet"] == ["data.alpha"]  # the frontier's facet unless told otherwise


def test_a_skip_entry_with_seeds_runs_those_points_with_fewer_seeds(tmp_path):
    body = FRONTIER.replace('seeds = [0]', 'seeds = [0, 1, 2]').replace(
        'metrics = ["final_accuracy", "fairness.worst"]',
        'metrics = ["final_accuracy", "fairness.worst"]\n'
        'skip = [{ "data.alpha" = 100, "train.lr" = [0.1, 0.2], "seed" = [1, 2] }, { "train.lr" = 0.2, "seed" = [0, 1, 2] }]')
    exp = load_experiment(write_experiment(tmp_path, body))
    assert [(p.values["data.alpha"], p.values["train.lr"], sorted(p.skipped_seeds)) for p in exp.points] == [
        (0.5, 0.05, []), (0.5, 0.1, []), (100.0, 0.05, []), (100.0, 0.1, [1, 2])]  # every seed skipped: no point
    out = tmp_path / "out"
    fake = FakeSimulate()
    run_experiment(exp, out=out, runner=fake)
    assert len(fake.commands) == 3 * 3 + 1
    rows = {(r["data.alpha"], r["train.lr"]): r["n"] for r in read_csv(out / "results.csv")}
    assert rows == {("0.5", "0.05"): "3", ("0.5", "0.1"): "3", ("100.0", "0.05"): "3", ("100.0", "0.1"): "1"}
    with pytest.raises(ExperimentError, match=r"skip\[0\].seed: 3 is not one of"):
        load_experiment(write_experiment(tmp_path, body.replace('"seed" = [1, 2]', '"seed" = [3]')))


def test_rounds_facet_takes_grid_keys_only(tmp_path):
    grid = load_experiment(write_experiment(tmp_path, FRONTIER.replace(
        'rounds_only =', 'rounds_facet = ["data.alpha", "train.lr"]\nrounds_only =')))
    assert grid.plot["rounds_facet"] == ["data.alpha", "train.lr"]
    with pytest.raises(ExperimentError, match="plot.rounds_facet: expected grid keys"):
        load_experiment(write_experiment(tmp_path, FRONTIER.replace('rounds_only =', 'rounds_facet = ["data.beta"]\n'
                                                                                     'rounds_only =')))


@pytest.mark.parametrize("skip, fragment", [
    ('[{ "data.beta" = 1 }]', "experiment.skip[0].data.beta: not an axis"),
    ('[{ "data.alpha" = 7 }]', "experiment.skip[0].data.alpha: 7.0 is not one of"),
    ('[{}]', "experiment.skip[0]: empty"),
    ('{ "data.alpha" = 7 }', "experiment.skip: expected a list"),
])
def test_a_bad_skip_names_its_entry(tmp_path, skip, fragment):
    body = FRONTIER.replace('metrics = ["final_accuracy", "fairness.worst"]',
                            f'metrics = ["final_accuracy", "fairness.worst"]\nskip = {skip}')
    with pytest.raises(ExperimentError) as info:
        load_experiment(write_experiment(tmp_path, body))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_frontier_series_may_combine_keys_and_a_redraw_may_take_a_new_layout(tmp_path, monkeypatch):
    from fedgov import plots

    exp = load_experiment(write_experiment(tmp_path, FRONTIER))
    out = tmp_path / "out"
    run_experiment(exp, out=out, runner=FakeSimulate())
    relaid = tmp_path / "relaid"
    relaid.mkdir()
    layout = write_experiment(relaid, FRONTIER.replace('facet = "data.alpha"', 'series = ["data.alpha", "train.lr"]'))
    assert load_experiment(layout).plot["series"] == ["data.alpha", "train.lr"]
    drawn = {}

    def keep(fig, out_png, *, dpi):
        drawn.setdefault("figs", []).append(fig)
        return Path(out_png)

    monkeypatch.setattr(plots, "_save", keep)
    assert plots.main(["experiment", str(out), "--spec", str(layout)]) == 0
    frontier = drawn["figs"][0]
    names = {text.get_text() for ax in frontier.axes if ax.get_legend() for text in ax.get_legend().get_texts()}
    # one colour per (alpha, lr) combination, named by both keys
    assert len(names) == 6 and all(name.count(",") == 2 for name in names)


SLEEPING_SWEEP = """
import os, sys, time
from pathlib import Path
import fedgov.experiment as ex
import fedgov.experiment.runner as runner

real = runner.subprocess_runner
pids = Path(sys.argv[1])

def sleeper(command):  # stands in for fedgov.simulate: a run that would go on for a minute
    return real([sys.executable, "-c",
                 f"import os, time; open({str(pids)!r} + '/' + str(os.getpid()), 'w').close(); time.sleep(60)"])

runner.subprocess_runner = sleeper
sys.exit(ex.main(sys.argv[2:]))
"""


def test_sigterm_to_the_sweep_stops_the_runs_it_started(tmp_path):
    import os
    import signal
    import time

    path = write_experiment(tmp_path, TINY)
    pids = tmp_path / "pids"
    pids.mkdir()
    sweep = subprocess.Popen([sys.executable, "-c", SLEEPING_SWEEP, str(pids), str(path),
                              "--out", str(tmp_path / "out"), "--jobs", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(started) < 2 and time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.1)
            started = [int(p.name) for p in pids.iterdir()]
        assert len(started) == 2, "the sweep did not start both runs"
        sweep.send_signal(signal.SIGTERM)
        _, err = sweep.communicate(timeout=30)
        assert sweep.returncode == 130 and "interrupted" in err
        for pid in started:  # each run was stopped, not left running without its sweep
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        sweep.kill()
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_once_a_sweep_is_stopped_no_run_starts_until_the_next_sweep(tmp_path):
    """A pool thread that took a job just before the stop must not start its run after it
    (the interrupted sweep would then wait for that run to finish)."""
    from fedgov.experiment import runner

    marker = tmp_path / "started"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    try:
        runner.stop_running()
        assert runner.subprocess_runner(command) == runner.STOPPED_BEFORE_START
        assert not marker.exists()
        runner.accept_runs()
        status, _, _ = runner.subprocess_runner(command)
        assert status == 0 and marker.exists()
    finally:
        runner.accept_runs()
