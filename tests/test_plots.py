import json
from pathlib import Path

import matplotlib.image
import pytest

from fedgov import plots
from fedgov.plots import plot_experiment, plot_run

PNG = b"\x89PNG\r\n\x1a\n"

RESULTS = """\
point,data.alpha,n,failed,final_accuracy_mean,final_accuracy_ci95_low,final_accuracy_ci95_high,fairness.worst_mean,fairness.worst_ci95_low,fairness.worst_ci95_high,note
data.alpha=0.1,0.1,3,0,0.80,0.75,0.85,0.40,0.30,0.50,
data.alpha=1.0,1.0,3,0,0.90,0.88,0.92,0.70,0.65,0.75,
data.alpha=100.0,100.0,2,1,0.93,0.92,0.94,0.85,0.80,0.90,
"""

SPEC = {"x": "data.alpha", "y": ["final_accuracy", "fairness.worst"], "xscale": "log",
        "title": "Label skew", "labels": {"data.alpha": "Dirichlet alpha"}}


def assert_png(path: Path, *, min_width: int = 800) -> None:
    assert path.read_bytes()[:8] == PNG
    height, width, _ = matplotlib.image.imread(path).shape
    assert width >= min_width and height > 300


RUNS = """\
point,data.alpha,seed,status,run_dir,final_accuracy,fairness.worst,seconds,error
data.alpha=0.1,0.1,0,ok,points/a,0.78,0.35,30.1,
data.alpha=0.1,0.1,1,done,points/b,0.82,0.45,,
data.alpha=100.0,100.0,0,failed,,,,12.0,ValueError: boom
"""


def test_plot_experiment_from_hand_made_results(tmp_path):
    csv_path = tmp_path / "results.csv"
    csv_path.write_text(RESULTS)
    (tmp_path / "runs.csv").write_text(RUNS)
    out = plot_experiment(csv_path, SPEC, tmp_path / "figure.png", runs_csv=tmp_path / "runs.csv")
    assert out == tmp_path / "figure.png"
    assert_png(out)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place


def test_plot_experiment_with_series_and_categorical_x(tmp_path):
    csv_path = tmp_path / "results.csv"
    csv_path.write_text(
        "point,strategy.name,data.alpha,n,failed,final_accuracy_mean,final_accuracy_ci95_low,final_accuracy_ci95_high\n"
        "a,fedavg,0.1,1,0,0.8,0.8,0.8\n"
        "b,fedavg,1.0,1,0,0.9,0.9,0.9\n"
        "c,fedprox,0.1,1,0,0.82,0.82,0.82\n"
        "d,fedprox,1.0,0,1,,,\n"  # a point with no successful run is left out, not drawn at 0
    )
    spec = {"x": "strategy.name", "series": "data.alpha", "y": ["final_accuracy"], "xscale": "linear"}
    assert_png(plot_experiment(csv_path, spec, tmp_path / "a.png"))
    spec = {"x": "data.alpha", "series": "strategy.name", "y": ["final_accuracy"], "xscale": "log"}
    assert_png(plot_experiment(csv_path, spec, tmp_path / "b.png"))


def test_plot_experiment_rejects_a_missing_column(tmp_path):
    csv_path = tmp_path / "results.csv"
    csv_path.write_text(RESULTS)
    with pytest.raises(ValueError, match="data.beta"):
        plot_experiment(csv_path, {**SPEC, "x": "data.beta"}, tmp_path / "figure.png")


def make_run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "20260101-000000-abcdef12"
    run_dir.mkdir()
    rows = [{"round": r, "accuracy": 0.5 + 0.1 * r, "loss": 1.0 / r, "worst_cooperative_accuracy": 0.3 + 0.1 * r,
             "cooperative_accuracy": {"0": 0.3 + 0.1 * r, "1": 0.6 + 0.1 * r, "2": 0.5}} for r in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.toml").write_text(
        'seed = 0\n[data]\ndataset = "digits"\npartition = "dirichlet"\nalpha = 0.5\nnum_cooperatives = 3\n'
        '[strategy]\nname = "fedavg"\n')
    return run_dir


def test_plot_run_from_hand_made_metrics(tmp_path):
    run_dir = make_run_dir(tmp_path)
    assert_png(plot_run(run_dir, tmp_path / "run.png"))


def test_cli(tmp_path, capsys):
    run_dir = make_run_dir(tmp_path)
    assert plots.main(["run", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "accuracy.png")
    assert_png(run_dir / "accuracy.png")

    results = tmp_path / "experiment"
    results.mkdir()
    (results / "results.csv").write_text(RESULTS)
    (results / "experiment.json").write_text(json.dumps({"plot": SPEC}))
    assert plots.main(["experiment", str(results), "-o", str(tmp_path / "redrawn.png")]) == 0
    assert_png(tmp_path / "redrawn.png")

    with pytest.raises(SystemExit) as exited:
        plots.main(["experiment", str(tmp_path / "nowhere")])
    assert exited.value.code == 2
    assert "not an experiment folder" in capsys.readouterr().err


def test_plot_frontier_one_point_per_policy_per_facet(tmp_path):
    from fedgov.config import Config
    from fedgov.experiment.spec import ExperimentError, _plot_spec
    from fedgov.plots import plot_frontier

    lines = ["point,governance.weighting,data.sybil_identities,data.num_cooperatives,n,failed,"
             "influence.run_by_actor.nakamoto_mean,influence.run_by_actor.nakamoto_ci95_low,"
             "influence.run_by_actor.nakamoto_ci95_high,final_accuracy_mean,final_accuracy_ci95_low,"
             "final_accuracy_ci95_high,fairness.worst_mean,fairness.worst_ci95_low,fairness.worst_ci95_high"]
    for members in (100, 1000):
        for sybils in (0, 9):
            for i, policy in enumerate(("samples", "equal", "sqrt", "capped")):
                lines.append(f"p,{policy},{sybils},{members},3,0,{i + 2 - sybils / 9},{i + 1},{i + 3},"
                             f"{0.9 - 0.01 * i},{0.88 - 0.01 * i},{0.92 - 0.01 * i},{0.5 + 0.05 * i},0.45,0.7")
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    grid = {"governance.weighting": ["samples", "equal", "sqrt", "capped"], "data.sybil_identities": [0, 9],
            "data.num_cooperatives": [100, 1000]}
    metrics = ("influence.run_by_actor.nakamoto", "final_accuracy", "fairness.worst")
    raw = {"kind": "frontier", "x": "influence.run_by_actor.nakamoto", "y": ["final_accuracy", "fairness.worst"],
           "point": "governance.weighting", "series": "data.sybil_identities", "facet": "data.num_cooperatives"}
    base = Config()
    spec = _plot_spec(raw, where="plot", grid=grid, base=base, metrics=metrics, title="frontier")
    assert spec["facet"] == ["data.num_cooperatives"] and spec["kind"] == "frontier"
    assert_png(plot_frontier(tmp_path / "results.csv", spec, tmp_path / "figure.png"))
    with pytest.raises(ExperimentError, match="data.num_cooperatives"):  # an axis left out of the figure
        _plot_spec({**raw, "facet": []}, where="plot", grid=grid, base=base, metrics=metrics, title="t")
    with pytest.raises(ExperimentError, match="plot.x"):
        _plot_spec({**raw, "x": "governance.weighting"}, where="plot", grid=grid, base=base, metrics=metrics,
                   title="t")


def test_frontier_labels_name_later_point_keys_and_leave_out_their_defaults(tmp_path, monkeypatch):
    import fedgov.plots as plots
    from fedgov.config import Config
    from fedgov.experiment.spec import ExperimentError, _plot_spec

    keys = ("governance.weighting", "governance.registrar_catch", "governance.registrar_fee")
    lines = ["point," + ",".join(keys) + ",n,failed,influence.run_by_actor.nakamoto_mean,"
             "influence.run_by_actor.nakamoto_ci95_low,influence.run_by_actor.nakamoto_ci95_high,"
             "final_accuracy_mean,final_accuracy_ci95_low,final_accuracy_ci95_high"]
    for i, (policy, catch, fee) in enumerate([("samples", 0.0, 0.0), ("equal", 0.0, 0.0), ("equal", 0.5, 0.0),
                                              ("equal", 0.0, 0.1)]):
        lines.append(f"p{i},{policy},{catch},{fee},3,0,{i + 1},{i},{i + 2},0.9,0.8,0.95")
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    grid = {"governance.weighting": ["samples", "equal"], "governance.registrar_catch": [0.0, 0.5],
            "governance.registrar_fee": [0.0, 0.1]}
    raw = {"kind": "frontier", "x": "influence.run_by_actor.nakamoto", "y": ["final_accuracy"], "point": list(keys),
           "point_names": {"governance": {"registrar_catch": "p", "registrar_fee": "fee"}}}
    metrics = ("influence.run_by_actor.nakamoto", "final_accuracy")
    spec = _plot_spec(raw, where="plot", grid=grid, base=Config(), metrics=metrics, title="t")
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, out_png, *, dpi: drawn.setdefault("fig", fig) and Path(out_png))
    plots.plot_frontier(tmp_path / "results.csv", spec, tmp_path / "f.png")
    texts = {t.get_text() for ax in drawn["fig"].axes for t in ax.texts}
    assert texts == {"samples", "equal", "equal / p=0.5", "equal / fee=0.1"}
    with pytest.raises(ExperimentError, match="point_names.governance.weighting"):  # the first key is never named
        _plot_spec({**raw, "point_names": {"governance.weighting": "w"}}, where="plot", grid=grid, base=Config(),
                   metrics=metrics, title="t")


def test_rounds_with_two_facets_and_one_metric_draw_a_grid(tmp_path, monkeypatch):
    import fedgov.plots as plots

    header = ["point", "variant", "stragglers", "mu", "metric", "round", "n", "mean", "ci95_low", "ci95_high", "min",
              "max"]
    rows = [",".join(header)]
    for variant in ("iid", "1-1"):
        for stragglers in ("0.0", "0.5", "0.9"):
            for mu in ("0.0", "1.0"):
                for r in (1, 2, 3):
                    loss = 2.0 / r + float(mu)
                    rows.append(",".join([f"{variant}-{stragglers}-{mu}", variant, stragglers, mu, "train_loss_by_round",
                                          str(r), "3", str(loss), str(loss), str(loss), str(loss - 0.1),
                                          str(loss + 0.1)]))
    csv = tmp_path / "rounds.csv"
    csv.write_text("\n".join(rows) + "\n")
    drawn = {}

    def keep(fig, out_png, *, dpi):
        drawn["fig"] = fig
        return Path(out_png)

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_rounds(csv, {"rounds": ["train_loss_by_round"], "facet": ["variant", "stragglers"]},
                      tmp_path / "f.png")
    axes = drawn["fig"].axes
    assert len(axes) == 6  # 2 datasets x 3 straggler rates
    assert [ax.get_title() for ax in axes] == [f"variant = {v} / stragglers = {s}" for v in ("iid", "1-1")
                                              for s in ("0.0", "0.5", "0.9")]
    assert all(len(ax.get_lines()) == 2 for ax in axes)  # one line per mu in every cell
