"""flowlib.tables renders the results tables the README quotes: checked against hand-written rows."""

from flowlib.tables import (
    image_markdown,
    image_students_markdown,
    regime_markdown,
    study_table1_markdown,
    verdicts_markdown,
)


def test_study_table1_row_and_a_single_seed_without_interval():
    rows = [{"arch": "glow", "model": "ilkd", "n": 5, "test_ll": -5.41812, "half_width": 0.0876,
             "params_k": 14.63, "best_steps": [5500, 8000, 6250], "all_plateaued": True},
            {"arch": "maf", "model": "nll", "n": 1, "test_ll": -4.8, "half_width": None, "params_k": 6.3,
             "best_steps": [10000], "all_plateaued": False}]
    lines = study_table1_markdown(rows).splitlines()
    assert lines[0].startswith("| arch | model | n | test LL (nats)")
    assert lines[2] == "| GLOW | ILKD Student | 5 | -5.418 ± 0.088 | 14.6 | 5,500–8,000 | yes |"
    assert lines[3] == "| MAF | Student | 1 | -4.800 ± – | 6.3 | 10,000 | no |"


def test_regime_row_verdicts():
    cell = {"arch": "glow", "method": "ilkd", "capacity": "tiny", "fraction": 1.0, "n": 3, "diff": 0.0462,
            "diff_low": 0.0121, "diff_high": 0.0803, "gap": 2.3981, "closure": 0.0193, "closure_low": 0.005,
            "closure_high": 0.0335, "p_holm": 0.6149, "helps": True, "helps_holm": False, "hurts": False}
    row = regime_markdown([cell]).splitlines()[2]
    assert row == ("| GLOW | ILKD | tiny | 100% | 3 | +0.046 [+0.012, +0.080] | 2.398 | "
                   "+0.02 [+0.01, +0.03] | 0.61 | helps on its own interval, not after Holm |")
    assert regime_markdown([{**cell, "helps_holm": True}]).endswith("| **helps** |")
    hurt = {**cell, "helps": False, "hurts": True, "closure": None}
    assert regime_markdown([hurt]).splitlines()[2].endswith("| 2.398 | n/a | 0.61 | **hurts** |")


def test_verdicts_and_image_rows():
    v = {"arch": "maf", "model": "LKD Student", "seeds": 5, "difference": -0.0042, "ci_low": -0.0314,
         "ci_high": 0.0238, "gap_closure": None, "verdict": "no effect beyond the noise"}
    assert verdicts_markdown([v]).splitlines()[2] == (
        "| MAF | LKD Student | 5 | -0.004 [-0.031, +0.024] | n/a | no effect beyond the noise |")
    rows = [{"model": "teacher", "seed": 0, "test_bpd": 3.5551, "test_bpd_stderr": 0.0075, "best_step": 16000,
             "last_step": 18000, "stopped_by": "patience"},
            {"model": "nll", "seed": 1, "test_bpd": 4.25, "best_step": 14500, "last_step": 15000,
             "stopped_by": "steps"},
            {"model": "nll", "seed": 0, "test_bpd": 4.15, "best_step": 19000, "last_step": 21000,
             "stopped_by": "patience"}]
    evaluation = {"image_rows": rows,
                  "table4": [{"model": "Teacher", "fid": 68.21, "fid_n_fake": 500},
                             {"model": "Student", "fid": 140.8, "fid_n_fake": 500}],
                  "table6": [{"model": "Teacher", "fid_T1.0": 28.6, "fid_T0.7": 40.7},
                             {"model": "Student", "fid_T1.0": 32.1, "fid_T0.7": 47.2}]}
    lines = image_markdown(evaluation).splitlines()
    assert "FID (n=500)" in lines[0]
    assert lines[2] == ("| Teacher | 3.555 ± 0.015 (n=1) | 3.555 | 16,000 / 18,000 (plateau) | 68.2 | 28.6 | "
                        "40.7 |")
    # mean ± sample standard deviation of 4.15 and 4.25; seeds in order
    assert lines[3] == ("| Student | 4.200 ± 0.071 (n=2) | 4.150, 4.250 | 19,000 / 21,000 (plateau); "
                        "14,500 / 15,000 (cap) | 140.8 | 32.1 | 47.2 |")


def test_image_students_markdown_lists_teacher_then_students_seed_by_seed():
    rows = [{"model": "ilkd", "seed": 0, "test_bpd": 4.1, "best_step": 18000, "last_step": 20000,
             "stopped_by": "patience"},
            {"model": "nll", "seed": 0, "test_bpd": 4.2, "best_step": 19000, "last_step": 21000,
             "stopped_by": "patience"},
            {"model": "teacher", "seed": 0, "test_bpd": 3.5551, "test_bpd_stderr": 0.0075, "best_step": 16000,
             "last_step": 18000, "stopped_by": "patience"}]
    lines = image_students_markdown(rows).splitlines()
    assert lines[0] == ("| model | bits/dim (± std over seeds; teacher ± 1.96 test SE) | per seed | "
                        "stopped (best / last step) |")
    assert lines[2:] == ["| Teacher | 3.555 ± 0.015 (n=1) | 3.555 | 16,000 / 18,000 (plateau) |",
                         "| Student | 4.200 ± – (n=1) | 4.200 | 19,000 / 21,000 (plateau) |",
                         "| ILKD Student | 4.100 ± – (n=1) | 4.100 | 18,000 / 20,000 (plateau) |"]
