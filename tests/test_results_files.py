"""The committed results of the full CPU reproduction (issue 8): structure, provenance and finiteness.

``python -m flowlib.run -f configs/cpu.yaml --threads 1`` writes ``results/*.json``, ``results/run.json``,
``results/REPORT.md`` and ``results/figures/``; these tests read what is committed, so a results folder that
lost a table, a seed or a figure, or holds a NaN, fails here.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "results"
NOTEBOOKS = sorted(p.stem for p in (RESULTS.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _numbers(obj, where=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{where}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield where, obj


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_notebook_has_full_size_results_with_finite_numbers(name):
    record = _load(name)
    assert record["notebook"] == name
    assert record["params"].get("fast") is False, f"{name}: committed results must come from the full run"
    assert record["provenance"]["commit"], f"{name}: no commit recorded"
    bad = [(w, v) for w, v in _numbers(record["results"]) if not math.isfinite(v)]
    assert not bad, f"{name}: non-finite numbers at {bad[:5]}"


def test_run_manifest_names_the_command_commit_machine_and_time_of_every_notebook():
    manifest = _load("run")
    assert set(manifest["notebooks"]) == set(NOTEBOOKS)
    for name, entry in manifest["notebooks"].items():
        assert entry["status"] == "ok", name
        assert entry["seconds"] > 0 and len(entry["commit"]) == 40, name
        assert entry["command"].startswith("python -m flowlib.run -f configs/cpu.yaml"), name
    machine = manifest["machine"]
    assert machine["cpus"] >= 1 and machine["torch"] and machine["python"]
    # every notebook's entry comes from an invocation on record
    runs = manifest["invocations"]
    for name, entry in manifest["notebooks"].items():
        assert any((r["started"], r["command"]) == (entry["started"], entry["command"])
                   and name in r["notebooks"] for r in runs), name
    # the budget: the whole run within 3 hours on the 2-core machine. The latest invocation that ran
    # every notebook (``--jobs 2`` runs two at a time) is judged by its wall clock; without one, the sum of
    # the notebook times.
    full = [r for r in runs if set(r["notebooks"]) == set(NOTEBOOKS)]
    spent = full[-1]["wall_seconds"] if full else manifest["notebook_seconds_total"]
    assert 0 < spent < 3 * 3600


def test_table1_is_the_studys_paper_cell_with_five_paired_seeds_per_student_row():
    record = _load("08_evaluation")
    r = record["results"]
    assert record["params"]["tabular_datasets"] == ["magic"]
    seeds = Counter((row["arch"], row["dataset"], row["model"]) for row in r["table1_rows"])
    settings = {(a, d) for a, d, _ in seeds}
    assert settings == {("glow", "magic"), ("maf", "magic")}
    for arch, dataset in settings:
        assert seeds[(arch, dataset, "teacher")] == 1
        for method in ("nll", "lkd", "ilkd") + (("skd",) if arch == "glow" else ()):
            failed = sum(1 for f in r["failures"]
                         if (f["arch"], f["dataset"], f["model"]) == (arch, dataset, method))
            assert seeds[(arch, dataset, method)] + failed >= 5, (arch, dataset, method)
    # the same models as notebook 10's paper cell: the same test log-likelihoods
    study = {(row["arch"], row["method"], row["seed"]): row["test_ll"]
             for row in _load("10_distillation_ablations")["results"]["rows"]
             if row["capacity"] in ("paper", "teacher") and row["fraction"] == 1.0
             and row.get("distance", "mse") == "mse"}
    for row in r["table1_rows"]:
        key = (row["arch"], row["model"], row["seed"])
        assert row["test_ll"] == pytest.approx(study[key], abs=1e-6), key
    summary = {(s["arch"], s["dataset"], s["model"]): s for s in r["table1_summary"]}
    for key, s in summary.items():
        assert s["count"] == seeds[key]
        if key[2] in ("lkd", "ilkd", "skd"):  # the gap closure is the documented formula of the means
            t, p = summary[key[:2] + ("teacher",)]["mean"], summary[key[:2] + ("nll",)]["mean"]
            assert s["gap_closure"] == pytest.approx((s["mean"] - p) / (t - p), rel=1e-9)


def test_every_teacher_stopped_on_its_validation_plateau():
    r = _load("04_teacher_training")["results"]
    teachers = {**r["tabular"], **r["image"]}
    assert set(teachers) == {"magic/glow", "magic/maf", "fashion-mnist-16/glow"}
    for name, t in teachers.items():
        assert t["stopped_by"] == "patience" and t["best_step"] < t["last_step"] <= t["step_cap"], name


def test_table2_times_every_model_and_students_are_smaller():
    r = _load("08_evaluation")["results"]
    rows = {(t["arch"], t["dataset"], t["model"]): t for t in r["table2"]}
    for (arch, dataset, model), t in rows.items():
        assert t["encode_ms_mean"] > 0 and t["decode_ms_mean"] > 0 and t["encode_ms_std"] >= 0
        if model == "Student":
            assert t["params_k"] < rows[(arch, dataset, "Teacher")]["params_k"]


def test_image_tables_state_their_sample_counts():
    r = _load("08_evaluation")["results"]
    assert {row["model"] for row in r["table4"]} == {"Teacher", "Student", "ILKD Student"}
    for row in r["table4"]:
        assert row["fid"] > 0 and row["fid_n_fake"] == r["fid_samples"] >= 500
        assert 0 < row["bpd_values"][0] < 8
    for row in r["table6"]:
        assert row["fid_T1.0"] > 0 and row["fid_T0.7"] > 0 and row["n"] == r["fid_samples"]


def _teacher_beats_every_student(rows: list[dict]) -> bool:
    """bits/dim, lower is better: the teacher's upper 95% bound below every student's lower one"""
    (teacher,) = [row for row in rows if row["model"] == "teacher"]
    t_high = teacher["test_bpd"] + 1.96 * teacher["test_bpd_stderr"]
    return all(t_high < row["test_bpd"] - 1.96 * row["test_bpd_stderr"] for row in rows if row is not teacher)


def test_image_models_stopped_on_their_plateau_and_the_teacher_beats_every_student():
    record = _load("06_ilkd")  # notebook 06 trains the image students and tests each one
    assert record["params"]["image_dataset"] == "fashion-mnist-16"
    rows = record["results"]["image_rows"]
    for method in ("nll", "ilkd"):  # plain and ILKD students paired by seed
        assert sorted(row["seed"] for row in rows if row["model"] == method) == [0, 1, 2, 3, 4]
    for row in rows:  # every image model, teacher and students, stopped on its validation plateau
        assert row["best_step"] < row["last_step"] and row["stopped_by"] == "patience", row
        assert row["n_test"] == 10_000, row
    assert _teacher_beats_every_student(rows)


def test_image_fid_rows_are_the_plateaued_students_of_notebook_06():
    # notebook 08 scores the same image models as notebook 06 (the teacher, 5 paired seeds of plain and ILKD
    # students, every one stopped on its validation plateau) and measures its FIDs on them
    rows = _load("08_evaluation")["results"]["image_rows"]
    rows06 = _load("06_ilkd")["results"]["image_rows"]
    key = lambda row: (row["model"], row["seed"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, rows06))
    assert {m: sum(r["model"] == m for r in rows) for m in ("teacher", "nll", "ilkd")} == {
        "teacher": 1, "nll": 5, "ilkd": 5}
    by_key = {key(r): r for r in rows06}
    for row in rows:
        assert row["test_bpd"] == pytest.approx(by_key[key(row)]["test_bpd"], abs=1e-9), row
        assert row["best_step"] < row["last_step"] and row["stopped_by"] == "patience", row
        assert row["n_test"] == 10_000, row
    assert _teacher_beats_every_student(rows)
    table4 = {t["model"]: t for t in _load("08_evaluation")["results"]["table4"]}
    assert set(table4) == {"Teacher", "Student", "ILKD Student"}
    for label, model in (("Student", "nll"), ("ILKD Student", "ilkd")):
        assert sorted(table4[label]["bpd_values"]) == pytest.approx(
            sorted(r["test_bpd"] for r in rows if r["model"] == model), abs=1e-12)
    assert all(t["fid_n_real"] == t["fid_n_fake"] == 500 and t["fid"] > 0 for t in table4.values())


def test_verdicts_figures_and_report_exist():
    r = _load("11_results")["results"]
    # MAGIC: GLOW LKD, ILKD, SKD and MAF LKD, ILKD against the plain student, paired by seed
    assert r["n_verdicts"] == 5
    assert all(v["seeds"] >= 5 and v["ci_low"] <= v["difference"] <= v["ci_high"] for v in r["verdicts"])
    image = r["image_verdict"]
    assert image["seeds"] == 5 and image["ci_low"] <= image["plain_minus_ilkd_bpd"] <= image["ci_high"]
    for figure in ("gap_closure.png", "samples_T0.7.png", "interpolation_T1.0.png"):
        path = RESULTS / "figures" / figure
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    report = (RESULTS / "REPORT.md").read_text()
    assert "Table 1 analogue" in report and "configs/cpu.yaml" in report


def test_selfnorm_784_study_has_paired_seeds_and_records_where_training_stopped():
    r = _load("09_self_normalizing_flows")["results"]
    dim = r["mnist_dim"]
    for name, m in dim["summary"].items():
        runs = [x for x in dim["runs"] if x["model"] == name]
        assert len(runs) >= 6, name  # >= 3 seeds, exact and SNF
        ci = m["snf_minus_exact"]
        assert ci["n"] >= 3 and ci["low"] <= ci["mean"] <= ci["high"], name
        for x in runs:
            assert x["best_step"] <= x["stopped"] <= dim["steps_cap"], (name, x["seed"], x["kind"])
    distilled = r["distilled_snf"]
    for method, m in distilled["methods"].items():
        assert m["distilled_minus_alone"]["n"] >= 3, method


def test_the_study_trained_every_model_to_its_plateau_and_says_whether_each_teacher_is_a_teacher():
    """Issue 16: every teacher and student of the committed study stopped on a validation plateau (its best
    step before its last evaluation); the teacher check is what the per-row margins say: the teacher beats
    every plain student by more than 1.96 standard errors of the per-row test log-likelihood difference."""
    r = _load("10_distillation_ablations")["results"]
    assert r["rows"]
    # all 139 runs of the committed study stopped on their plateau: the two GLOW ILKD students that had
    # reached the first cap (30,000 steps) were extended under the raised one (plateaus at 33,000, 39,500)
    for row in r["rows"]:
        assert row["stopped_by"] == "patience", row
        assert row["best_step"] < row["last_step"] and row["plateaued"], row
    assert max(row["last_step"] for row in r["rows"]) > 30_000
    conv = {(c["arch"], c["method"]): c for c in r["convergence"]}
    for (arch, method), c in conv.items():
        runs = [row for row in r["rows"] if (row["arch"], row["method"]) == (arch, method)]
        assert c["runs"] == len(runs) and c["plateaued"] == sum(row["plateaued"] for row in runs)
    for check in r["teacher_check"]:
        plain = [row for row in r["rows"] if row["arch"] == check["arch"] and row["method"] == "nll"]
        lowest = min(row["teacher_margin"] - 1.96 * row["teacher_margin_stderr"] for row in plain)
        assert check["min_margin_low"] == pytest.approx(lowest)
        assert check["teacher better than every plain student"] == (lowest > 0)
    assert {c["arch"] for c in r["teacher_check"]} == {"glow", "maf"}
    assert all(c["teacher better than every plain student"] for c in r["teacher_check"])  # both are teachers


def test_the_regime_map_has_three_by_three_cells_with_paired_intervals():
    r = _load("10_distillation_ablations")["results"]
    for arch in ("glow", "maf"):
        cells = [c for c in r["cells"] if c["arch"] == arch and c["method"] == "ilkd"]
        assert len({c["capacity"] for c in cells}) >= 3 and len({c["fraction"] for c in cells}) >= 3
        for c in cells:
            assert c["n"] >= 3 and c["diff_low"] <= c["diff"] <= c["diff_high"], c
            assert c["helps"] == (c["diff_low"] > 0)
        paper = {c["method"]: c for c in r["cells"]
                 if (c["arch"], c["capacity"], c["fraction"]) == (arch, "paper", 1.0)}
        # the paper's cell: every method against the plain student with 5 paired seeds, the paper's L1 with 3
        assert set(paper) == {"lkd", "ilkd", "ilkd (l1)"} | ({"skd"} if arch == "glow" else set())
        assert all(c["n"] >= (3 if method == "ilkd (l1)" else 5) for method, c in paper.items())
    # Holm's adjustment over the whole table: never below the cell's own p, and "helps" only when it holds
    tested = [c for c in r["cells"] if c["p_value"] is not None]
    assert len(tested) == len(r["cells"]) >= 23
    for c in tested:
        assert c["p_value"] <= c["p_holm"] <= 1 and c["helps_holm"] == (c["p_holm"] < 0.05 and c["diff"] > 0)
    assert r["conclusions"][-1].startswith("All methods and cells together (23 paired comparisons")
    figure = RESULTS / "figures" / "10_regime_map.png"
    assert figure.exists() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
