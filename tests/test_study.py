"""Tests of flowlib.study: the paper's tabular experiment to convergence and the regime map (issue 16)."""

import math

import pytest
import torch
from scipy import stats

from flowlib import study
from flowlib.models import build_model, count_parameters
from flowlib.study import cell_table, paper_table, prioritised, study_config, study_jobs


def _row(arch, method, capacity, fraction, seed, ll, **extra):
    return {"arch": arch, "method": method, "capacity": capacity, "fraction": fraction, "seed": seed,
            "test_ll": ll, "test_ll_stderr": 0.01, "params_k": 1.0, "best_step": 10, "last_step": 20,
            "plateaued": True, **extra}


def test_cell_table_is_the_paired_t_interval_over_seeds_divided_by_the_gap():
    plain = [-5.0, -5.2, -4.9]
    ilkd = [-4.8, -4.95, -4.6]  # differences 0.2, 0.25, 0.3
    rows = [_row("maf", "teacher", "teacher", 1.0, 0, -4.0)]
    rows += [_row("maf", "nll", "paper", 1.0, s, v) for s, v in enumerate(plain)]
    rows += [_row("maf", "ilkd", "paper", 1.0, s, v) for s, v in enumerate(ilkd)]
    (cell,) = cell_table(rows)
    diffs = [0.2, 0.25, 0.3]
    mean = sum(diffs) / 3
    half = stats.t.ppf(0.975, 2) * 0.05 / math.sqrt(3)  # the sample sd of (0.2, 0.25, 0.3) is 0.05
    gap = -4.0 - sum(plain) / 3
    assert cell["n"] == 3 and cell["diff"] == pytest.approx(mean)
    assert cell["diff_low"] == pytest.approx(mean - half) and cell["diff_high"] == pytest.approx(mean + half)
    assert cell["gap"] == pytest.approx(gap)
    assert cell["closure"] == pytest.approx(mean / gap)
    assert cell["closure_low"] == pytest.approx((mean - half) / gap)
    assert cell["helps"] is True and cell["hurts"] is False


def test_cell_table_pairs_by_seed_and_gives_no_closure_without_a_gap():
    rows = [_row("glow", "teacher", "teacher", 1.0, 0, -6.0)]  # worse than the students: no gap to close
    rows += [_row("glow", "nll", "tiny", 0.1, s, v) for s, v in [(0, -5.0), (1, -5.5), (2, -5.2)]]
    rows += [_row("glow", "ilkd", "tiny", 0.1, s, v) for s, v in [(2, -5.3), (1, -5.4)]]  # seed 0 missing
    (cell,) = cell_table(rows)
    assert cell["n"] == 2 and cell["diff"] == pytest.approx(((-5.3 + 5.2) + (-5.4 + 5.5)) / 2)
    assert cell["gap"] < 0 and cell["closure"] is None and cell["closure_low"] is None


def test_cell_table_gives_each_cell_its_paired_t_test_and_holms_correction_over_the_table():
    rows = [_row("maf", "teacher", "teacher", 1.0, 0, -4.0)]
    rows += [_row("maf", "nll", "paper", 1.0, s, v) for s, v in enumerate([-5.0, -5.2, -4.9])]
    rows += [_row("maf", "ilkd", "paper", 1.0, s, v) for s, v in enumerate([-4.8, -4.95, -4.6])]
    rows += [_row("maf", "lkd", "paper", 1.0, s, v) for s, v in enumerate([-5.1, -5.0, -4.95])]
    rows += [_row("maf", "nll", "tiny", 1.0, s, v) for s, v in enumerate([-7.0, -7.5])]
    rows += [_row("maf", "ilkd", "tiny", 1.0, s, v) for s, v in enumerate([-6.9, -7.3])]
    cells = {(c["capacity"], c["method"]): c for c in cell_table(rows)}
    expected = {
        ("paper", "ilkd"): stats.ttest_rel([-4.8, -4.95, -4.6], [-5.0, -5.2, -4.9]).pvalue,
        ("paper", "lkd"): stats.ttest_rel([-5.1, -5.0, -4.95], [-5.0, -5.2, -4.9]).pvalue,
        ("tiny", "ilkd"): stats.ttest_rel([-6.9, -7.3], [-7.0, -7.5]).pvalue,
    }
    for key, p in expected.items():
        assert cells[key]["p_value"] == pytest.approx(p, rel=1e-9), key
    # Holm by hand: the smallest p times 3, the next times 2 (at least the previous), the largest times 1
    ranked = sorted(expected, key=expected.get)
    holm, running = {}, 0.0
    for factor, key in zip((3, 2, 1), ranked):
        running = max(running, min(1.0, factor * expected[key]))
        holm[key] = running
    for key in expected:
        assert cells[key]["p_holm"] == pytest.approx(holm[key], rel=1e-9), key
        assert cells[key]["helps_holm"] == (holm[key] < 0.05 and cells[key]["diff"] > 0)
    assert cells[("paper", "ilkd")]["helps"] is True  # on its own interval, which Holm may not keep
    summary = study.regime_summary(list(cells.values()))
    assert summary[-1].startswith("All methods and cells together (3 paired comparisons")


def test_holm_adjustment_matches_a_hand_example():
    from flowlib.metrics import holm_adjusted
    # sorted 0.01, 0.03, 0.04 -> 0.03, 0.06, max(0.06, 0.04): given back in the input's order
    assert holm_adjusted([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjusted([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm_adjusted([]) == []


def test_paper_table_means_and_intervals():
    rows = [_row("maf", "teacher", "teacher", 1.0, 0, -4.0)]
    rows += [_row("maf", "nll", "paper", 1.0, s, v) for s, v in enumerate([-5.0, -5.2])]
    rows += [_row("maf", "nll", "tiny", 1.0, 0, -9.0)]  # another cell: not in Table 1's analogue
    table = {r["model"]: r for r in paper_table(rows)}
    assert table["nll"]["n"] == 2 and table["nll"]["test_ll"] == pytest.approx(-5.1)
    assert table["nll"]["half_width"] == pytest.approx(stats.t.ppf(0.975, 1) * math.sqrt(0.02) / math.sqrt(2))
    assert table["teacher"]["half_width"] == pytest.approx(1.96 * 0.01)
    assert table["nll"]["all_plateaued"] is True


def test_study_jobs_cover_a_three_by_three_map_and_the_papers_cell():
    jobs = study_jobs("glow", seeds=range(5), map_seeds=range(3))
    cells = {(j["capacity"], j["fraction"]) for j in jobs}
    assert len(cells) == 9
    paper = [j for j in jobs if (j["capacity"], j["fraction"]) == ("paper", 1.0)]
    assert {j["method"] for j in paper} == {"nll", "lkd", "ilkd", "skd"}
    # the paper's tables: every method with the 5 paired seeds; the rest of the map with 3
    for method in ("nll", "lkd", "ilkd", "skd"):
        assert sorted(j["seed"] for j in paper if j["method"] == method) == [0, 1, 2, 3, 4]
    assert len(paper) == 4 * 5
    other = [j for j in jobs if (j["capacity"], j["fraction"]) != ("paper", 1.0)]
    assert {j["method"] for j in other} == {"nll", "ilkd"} and len(other) == 8 * 2 * 3
    ordered = prioritised(jobs, first_seeds=3)
    first = ordered[: len(other) + 2 * 3]  # the map (plain, ILKD, 3 seeds) comes first
    assert {(j["capacity"], j["fraction"]) for j in first} == cells
    assert all(j["seed"] < 3 and j["method"] in ("nll", "ilkd") for j in first)


def test_study_configs_are_the_papers_students_and_converge():
    teacher, student = study_config("glow", "teacher"), study_config("glow", "ilkd", seed=3)
    assert student.teacher == teacher and student.seed == 3 and teacher.seed == 0
    assert teacher.patience and student.patience and student.distance == "mse"
    d = 6  # POWER: the paper's Table 2 counts 86.7K (teacher) / 13.8K (student)
    t = count_parameters(build_model("glow", (d,), **study.PAPER_TEACHERS["glow"]), lu="free") / 1000
    s = count_parameters(build_model("glow", (d,), **student.model_kwargs), lu="free") / 1000
    assert t == pytest.approx(86.7, rel=0.03) and s == pytest.approx(13.8, rel=0.03)
    # the study's GLOW teacher replaces the paper's (which overfits MAGIC), and is still much larger
    assert teacher.model_kwargs == study.TEACHERS["glow"] != study.PAPER_TEACHERS["glow"]
    assert study.TEACHERS["maf"] == study.PAPER_TEACHERS["maf"]
    big = count_parameters(build_model("glow", (10,), **teacher.model_kwargs), lu="free")
    assert big > 2.5 * count_parameters(build_model("glow", (10,), **student.model_kwargs), lu="free")
    assert study_config("maf", "nll", fraction=0.3).train_fraction == 0.3
    with pytest.raises(ValueError, match="capacity"):
        study_config("maf", "nll", capacity="huge")
    with pytest.raises(ValueError, match="fraction"):
        study_config("maf", "nll", fraction=1.5)


def test_evaluate_model_margin_is_zero_against_itself():
    torch.manual_seed(0)
    model = build_model("maf", (10,), depth=1, hidden=8).eval()
    out = study.evaluate_model(model, "magic", reference=model)
    assert out["teacher_margin"] == 0.0 and out["n_test"] == 1890
    assert math.isfinite(out["test_ll"]) and out["test_ll_stderr"] > 0


@pytest.mark.slow
def test_a_fast_study_trains_every_job_and_tables_it(tmp_path):
    jobs = study_jobs("maf", seeds=[0, 1], map_seeds=[0], fractions=(0.3, 1.0), capacities=["paper", "tiny"],
                      fast=True)
    rows = study.run_study(jobs, fast=True, checkpoint_root=tmp_path, progress=False,
                           rows_path=tmp_path / "rows.json")
    assert len(rows) == len(jobs) + 1 and rows[0]["method"] == "teacher"
    assert all(r["best_step"] is not None and r["last_step"] >= r["best_step"] for r in rows)
    cells = cell_table(rows)
    assert {(c["capacity"], c["fraction"], c["method"]) for c in cells} == {
        ("paper", 0.3, "ilkd"), ("paper", 1.0, "ilkd"), ("paper", 1.0, "lkd"), ("tiny", 0.3, "ilkd"),
        ("tiny", 1.0, "ilkd")}
    plain = [r for r in rows if r["method"] == "nll"]
    assert all("teacher_margin" in r for r in plain)
    assert (tmp_path / "rows.json").exists()


def test_interval_verdict_claims_only_what_the_interval_carries():
    from flowlib.metrics import interval_verdict, paired_interval

    def verdict(plain, distilled):
        return interval_verdict(paired_interval(plain, distilled))

    assert verdict([0.0, 0.0, 0.0], [0.2, 0.25, 0.3]) == "helps (95% interval above 0)"
    assert verdict([0.2, 0.25, 0.3], [0.0, 0.0, 0.0]) == "hurts (95% interval below 0)"
    assert verdict([0.0, 0.0, 0.0], [0.1, -0.1, 0.05]) == "no effect beyond the noise"
    assert verdict([0.0], [1.0]) == "one seed: no claim"
