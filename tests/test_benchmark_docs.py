"""The benchmark numbers typed into docs/benchmarks.md and the README are the committed results'.

Those pages quote a results folder and the code that wrote it; when the folder is regenerated
and the prose is not (or the other way round), these tests fail and name the figure.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"

# The round table's rows, as the page names them, and the results.json row each one quotes.
ROUND_ROWS = {("none", "pool"): ("none", "pool"), ("HE `standard`", "pool"): ("he", "pool"),
              ("HE `compact`", "pool"): ("he-compact", "pool"), ("SecAgg+", "pool"): ("secagg+", "pool"),
              ("DP-SGD", "pool"): ("dp", "pool"), ("DP with HE", "pool"): ("dp+he", "pool"),
              ("none", "Flower's"): ("none", "flower")}

# The overhead table (10^7 parameters): the row's first words, and the aggregation row it quotes.
OVERHEAD_ROWS = {"plain": ("plain", None), "HE `standard`": ("he", "standard"), "HE `compact`": ("he", "compact"),
                 "HE, NVIDIA FLARE's defaults": ("he", "flare"), "SecAgg+ masking": ("secagg+", None)}
OVERHEAD_PARAMS = 10_000_000


def _quotes(cell: str, value: float) -> bool:
    """Whether ``cell`` is ``value`` rounded to as many significant digits as the cell writes."""
    written = len(cell.replace(".", "").lstrip("0")) or 1  # "25.0" writes 3, "2" writes 1
    return float(cell) == float(f"{value:.{written}g}")


def _cited_folder(text: str, lead: str) -> Path:
    found = re.search(re.escape(lead) + r"\s+`(benchmarks/results/[^`]+?)/?`", text)
    assert found, f"no results folder after {lead!r}"
    return ROOT / found.group(1)


def _results(folder: Path) -> dict:
    path = folder / "results.json"
    assert path.is_file(), f"{path.relative_to(ROOT)} is cited but not committed"
    return json.loads(path.read_text())


def _main_folder() -> Path:
    return _cited_folder(BENCH_DOC.read_text(), "Every number below is from")


def _table_rows(text: str, width: int) -> list[list[str]]:
    """The cells of every markdown table row of ``width`` columns in ``text``."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.lstrip().startswith("|")]
    return [cells for cells in rows if len(cells) == width]


def _round_rows(results: dict) -> dict[tuple[str, str], dict]:
    return {(r["mechanism"], r["engine"]): r for r in results["rows"] if r["suite"] == "round" and r["kind"] == "round"}


def test_the_benchmark_page_names_the_code_that_wrote_each_folder_it_quotes():
    text = BENCH_DOC.read_text()
    main = _results(_main_folder())
    named = re.search(r"and the git commit, ([0-9a-f]{7,40})\)", text)
    assert named and main["code"]["git_commit"].startswith(named.group(1))
    deployment_folder = _cited_folder(text, "(`deployment` suite, from")
    deployment = _results(deployment_folder)
    by = re.search(re.escape(deployment_folder.relative_to(ROOT).as_posix()) + r"[^)]*?by code ([0-9a-f]{7,40})", text)
    assert by and deployment["code"]["git_commit"].startswith(by.group(1))


def test_the_round_table_is_the_round_suite_of_the_quoted_folder():
    text = BENCH_DOC.read_text()
    rows = _round_rows(_results(_main_folder()))
    seen = set()
    for cells in _table_rows(text, 6):
        if (cells[0], cells[1]) not in ROUND_ROWS:
            continue
        row = rows[ROUND_ROWS[cells[0], cells[1]]]
        assert cells[2:5] == [f"{row['round_seconds']:.3f}", f"{row['round_ratio']:.2f}", f"{row['floor_ratio']:.2f}"], cells
        seen.add((cells[0], cells[1]))
    assert seen == set(ROUND_ROWS), f"rows missing from the round table: {set(ROUND_ROWS) - seen}"


def test_the_overhead_table_is_the_aggregation_suite_at_ten_million_parameters():
    rows = {(r["mechanism"], r["preset"]): r for r in _results(_main_folder())["rows"]
            if r["suite"] == "aggregation" and r["kind"] == "measurement" and r["params"] == OVERHEAD_PARAMS}
    seen = set()
    for cells in _table_rows(BENCH_DOC.read_text(), 5):
        name = next((n for n in OVERHEAD_ROWS if cells[0].startswith(n)), None)
        if name is None:
            continue
        row = rows[OVERHEAD_ROWS[name]]
        quoted = (row["client_seconds_ratio"], row["server_seconds_ratio"], row["bytes_per_param"],
                  row["bytes_per_client_ratio"])
        assert all(_quotes(c, v) for c, v in zip(cells[1:], quoted)), (cells, quoted)
        seen.add(name)
    assert seen == set(OVERHEAD_ROWS), f"rows missing from the overhead table: {set(OVERHEAD_ROWS) - seen}"


def test_the_readme_quotes_the_same_folder_and_its_numbers():
    text = " ".join(README.read_text().split())
    folder = _main_folder()
    assert f"`{folder.relative_to(ROOT).as_posix()}/`" in text
    results = _results(folder)
    rounds = _round_rows(results)
    dp = re.search(r"DP-SGD makes a round ([0-9.]+) times as long as a plain one and HE ([0-9.]+) times", text)
    assert dp, "the README's round-cost sentence changed; update this test with it"
    assert dp.group(1) == f"{rounds['dp', 'pool']['round_ratio']:.1f}"
    assert dp.group(2) == f"{rounds['he', 'pool']['round_ratio']:.2f}"
    p99 = re.search(r"\(([0-9.]+) ms p99\)", text)
    inference = [r for r in results["rows"] if r["suite"] == "realtime" and r["kind"] == "inference"
                 and r["model"] == "logreg" and r["mode"] == "he"]
    assert p99 and len(inference) == 1 and p99.group(1) == f"{inference[0]['latency_p99_ms']:.1f}"


@pytest.mark.parametrize("page", [BENCH_DOC, README], ids=["benchmarks.md", "README.md"])
def test_every_benchmark_folder_a_page_names_is_committed(page):
    for folder in set(re.findall(r"benchmarks/results/([A-Za-z0-9._-]+)/", page.read_text())):
        assert (ROOT / "benchmarks" / "results" / folder).is_dir(), f"{page.name} names benchmarks/results/{folder}/"
