"""The documentation site's generated pages say what the code and the committed results say.

``mkdocs build --strict`` (run by .ci/run) fails on a broken link or a page left out of the
navigation; these tests check what the pages hold, from the same sources.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

from fedgov import doc_pages
from fedgov.config import reference_rows

ROOT = Path(__file__).resolve().parents[1]


def test_the_config_reference_lists_every_key_once_with_its_default():
    page = doc_pages.config_reference_page()
    for key, default, _ in reference_rows():
        assert page.count(f"| `{key}` | `{default!r}` |") == 1, key


def test_every_committed_experiment_has_a_page_in_the_navigation():
    names = doc_pages.experiment_names()
    assert names == sorted(p.parent.name for p in (ROOT / "experiments" / "results").glob("*/results.csv")
                           if (ROOT / "experiments" / f"{p.parent.name}.toml").is_file())

    nav = re.findall(r"^\s*- (?:[^:\n]+: )?(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    assert {f"experiments/{n}.md" for n in names} <= set(nav)
    assert doc_pages.CONFIG_PAGE in nav


def test_an_experiment_page_shows_every_grid_point_as_results_csv_has_it():
    for name in doc_pages.experiment_names():
        page = doc_pages.experiment_page(name)
        meta = json.loads((ROOT / "experiments" / "results" / name / "experiment.json").read_text())
        assert f"python -m fedgov.experiment experiments/{name}.toml" in page
        assert meta["code"]["git_commit"][:10] in page
        with (ROOT / "experiments" / "results" / name / "results.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        metric = meta["metrics"][0]
        for row in rows:
            if row[f"{metric}_mean"]:
                assert doc_pages._number(row[f"{metric}_mean"]) in page, (name, row["point"])
        for figure in doc_pages.FIGURES:
            shown = f"({name}/{figure})" in page
            assert shown == (ROOT / "experiments" / "results" / name / figure).is_file(), (name, figure)


def test_the_prose_places_the_generated_parts_and_the_rest_are_appended(tmp_path):
    experiments = tmp_path / "experiments"
    shutil.copytree(ROOT / "experiments" / "results" / "heterogeneity", experiments / "results" / "heterogeneity")
    (experiments / "heterogeneity.toml").write_text("")
    (experiments / "heterogeneity.md").write_text("# Skew\n\nBefore.\n\n{{ table }}\n\nAfter.\n")
    page = doc_pages.experiment_page("heterogeneity", experiments)
    assert page.startswith("# Skew\n")
    assert page.index("Before.") < page.index("| `0.1` | 3 | 0.917 [0.907, 0.928]") < page.index("After.")
    assert page.count("Mean [95% CI] over seeds") == 1 and "{{" not in page
    assert page.rstrip().endswith("(heterogeneity/figure.png)")  # not placed: appended
    assert doc_pages.experiment_names(experiments) == ["heterogeneity"]


def test_the_readme_links_only_to_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert local, "the README links to nothing in the repository"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing
