"""Published notebooks (issue 18): flowlib.publish copies a run's executed notebooks with their provenance,
and the committed results/notebooks/ hold every notebook of results/run.json, without errors, with every
figure and number the README's results quote."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flowlib.publish import PROVENANCE_KEYS, error_outputs, provenance, publish_notebooks
from flowlib.results import project_path
from flowlib.tables import (
    image_markdown,
    image_students_markdown,
    regime_markdown,
    study_table1_markdown,
    verdicts_markdown,
)

RESULTS = project_path("results")
PUBLISHED = RESULTS / "notebooks"


def _notebook(outputs: list[dict]) -> dict:
    return {"cells": [{"cell_type": "code", "source": "x = 1", "metadata": {}, "execution_count": 1,
                       "outputs": outputs}],
            "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def _run_record(tmp_path: Path, notebooks: dict[str, dict], status: str = "ok") -> Path:
    executed = tmp_path / "runs" / "20260101-000000"
    executed.mkdir(parents=True)
    for name, nb in notebooks.items():
        (executed / f"{name}.ipynb").write_text(json.dumps(nb))
    entry = {"command": "python -m flowlib.run -f configs/cpu.yaml", "commit": "abc123", "started": "then",
             "executed_notebooks": str(executed), "seconds": 1.0, "status": status}
    results = tmp_path / "results"
    results.mkdir()
    (results / "run.json").write_text(json.dumps({"notebooks": {n: entry for n in notebooks}}))
    return results


def test_publish_copies_outputs_and_stamps_provenance(tmp_path):
    widget = {"output_type": "display_data", "metadata": {},
              "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "x"}}}
    bar = {"output_type": "stream", "name": "stderr", "text": "train: 100%|####| 10/10 [00:01, 9.1it/s]"}
    table = {"output_type": "execute_result", "execution_count": 1, "metadata": {},
             "data": {"text/plain": "-5.436"}}
    results = _run_record(tmp_path, {"05_lkd": _notebook([widget, bar, table])})
    [path] = publish_notebooks(results)
    assert path == results / "notebooks" / "05_lkd.ipynb"
    nb = json.loads(path.read_text())
    assert nb["cells"][0]["outputs"] == [table]  # the widget and the progress bar are gone, the table kept
    record = json.loads((results / "run.json").read_text())["notebooks"]["05_lkd"]
    assert provenance(nb) == {k: record[k] for k in PROVENANCE_KEYS}


def test_publish_refuses_errors_missing_copies_and_unfinished_runs(tmp_path):
    error = {"output_type": "error", "ename": "ValueError", "evalue": "bad", "traceback": []}
    results = _run_record(tmp_path / "a", {"05_lkd": _notebook([error])})
    with pytest.raises(ValueError, match="error outputs"):
        publish_notebooks(results)
    assert not (results / "notebooks" / "05_lkd.ipynb").exists()
    results = _run_record(tmp_path / "b", {"05_lkd": _notebook([])})
    (Path(json.loads((results / "run.json").read_text())["notebooks"]["05_lkd"]["executed_notebooks"])
     / "05_lkd.ipynb").unlink()
    with pytest.raises(FileNotFoundError, match="--only 05"):
        publish_notebooks(results)
    with pytest.raises(ValueError, match="no entry for"):
        publish_notebooks(results, ["99_nothing"])
    results = _run_record(tmp_path / "c", {"05_lkd": _notebook([])}, status="failed")
    with pytest.raises(ValueError, match="did not finish"):
        publish_notebooks(results)


def test_an_entry_whose_executed_copy_was_lost_keeps_its_published_copy(tmp_path):
    results = _run_record(tmp_path, {"05_lkd": _notebook([]), "06_ilkd": _notebook([])})
    record = json.loads((results / "run.json").read_text())
    entry = record["notebooks"]["06_ilkd"]
    (Path(entry["executed_notebooks"]) / "06_ilkd.ipynb").unlink()
    entry["executed_copy_lost"] = "the machine was shut down"
    (results / "run.json").write_text(json.dumps(record))
    (results / "notebooks").mkdir()
    earlier = results / "notebooks" / "06_ilkd.ipynb"
    earlier.write_text("earlier copy")
    assert [p.name for p in publish_notebooks(results)] == ["05_lkd.ipynb"]
    assert earlier.read_text() == "earlier copy"  # left as it was
    with pytest.raises(FileNotFoundError, match="was lost .*--only 06"):
        publish_notebooks(results, ["06_ilkd"])


# --------------------------------------------------------------------------------------------------
# the committed published notebooks
# --------------------------------------------------------------------------------------------------

def _published() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(PUBLISHED.glob("*.ipynb"))}


def _output_text(nb: dict) -> str:
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            parts += ["".join(v) for k, v in out.get("data", {}).items() if k.startswith("text/")]
    return "\n".join(parts).replace("−", "-")


def test_every_notebook_of_the_run_is_published_with_its_provenance():
    run = json.loads((RESULTS / "run.json").read_text())
    record = run["notebooks"]
    published = _published()
    assert sorted(published) == sorted(record)
    for name, nb in published.items():
        entry = record[name]
        if entry.get("executed_copy_lost"):  # published by the earlier invocation it names, which ran it
            (entry,) = [inv for inv in run["invocations"]
                        if inv["started"] == entry["published_from"] and name in inv["notebooks"]]
        assert provenance(nb) == {k: entry[k] for k in PROVENANCE_KEYS}, name
        assert not error_outputs(nb), name
        assert any(c.get("outputs") for c in nb["cells"]), f"{name} has no outputs"
    size = sum(p.stat().st_size for p in PUBLISHED.iterdir())
    assert size < 15e6, f"results/notebooks is {size / 1e6:.1f} MB"


def _readme_results() -> str:
    readme = project_path("README.md").read_text()
    return readme.split("\n## Results\n", 1)[1].split("\n## Performance\n", 1)[0]


def test_every_figure_the_readme_quotes_is_drawn_in_a_published_notebook():
    figures = sorted(set(re.findall(r"results/figures/([\w.-]+\.png)", _readme_results())))
    assert figures
    for figure in figures:
        assert (RESULTS / "figures" / figure).exists(), figure
        drawn = [name for name, nb in _published().items() for c in nb["cells"]
                 if figure in "".join(c["source"]) and any("image/png" in o.get("data", {})
                                                            for o in c.get("outputs", []))]
        assert drawn, f"no published notebook draws {figure}"


def test_every_number_in_the_readme_result_tables_appears_in_the_published_notebooks():
    text = "\n".join(_output_text(nb) for nb in _published().values())
    rows = [line for line in _readme_results().splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]
    assert len(rows) > 50
    missing = []
    for row in rows:
        for number in re.findall(r"[-+]?\d+\.\d{2,}", row.replace("−", "-")):
            if number not in text and number.lstrip("+") not in text:
                missing.append((number, row[:80]))
    assert not missing, missing[:10]


def test_readme_tables_are_the_notebooks_markdown():
    """The study's and the image tables in the README are flowlib.tables' rendering of the results."""
    load = lambda name: json.loads((RESULTS / f"{name}.json").read_text())["results"]  # noqa: E731
    from flowlib.study import paper_table

    r06, r08, r10, r11 = (load(name) for name in ("06_ilkd", "08_evaluation", "10_distillation_ablations",
                                                   "11_results"))
    readme = _readme_results()
    for table in (study_table1_markdown(paper_table(r10["rows"])), regime_markdown(r10["cells"]),
                  verdicts_markdown(r11["verdicts"]), image_markdown(r08),
                  image_students_markdown(r06["image_rows"])):
        for line in table.splitlines():
            assert line in readme, line
