"""Coursework (issue 18): the exercises' checks, the nbgrader release built from the notebooks, and the
autograder scoring a blank release 0, the solutions full marks and wrong answers below full marks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowlib import exercises as E
from flowlib.course import ASSIGNMENT, _scores, build_release, score_table
from flowlib.results import project_path

NOTEBOOKS = project_path("notebooks")


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _grader(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def solutions(notebook: str) -> dict:
    """The functions a notebook's solution cells define (executed without running the notebook)."""
    namespace = {"math": math, "torch": torch}
    for cell in _cells(NOTEBOOKS / f"{notebook}.ipynb"):
        if _grader(cell).get("solution"):
            exec(compile("".join(cell["source"]), f"{notebook} solution", "exec"), namespace)
    return namespace


def test_every_exercise_is_marked_for_nbgrader():
    for notebook, checks in E.EXERCISES.items():
        cells = _cells(NOTEBOOKS / f"{notebook}.ipynb")
        graded = {_grader(c)["grade_id"]: c for c in cells if _grader(c).get("grade")}
        assert {g: graded[g]["metadata"]["nbgrader"]["points"] for g in graded} == checks, notebook
        for grade_id, cell in graded.items():
            assert _grader(cell)["locked"] and not _grader(cell)["solution"]
            assert f"{grade_id}(" in "".join(cell["source"])  # the check cell calls its check
        for cell in cells:
            if _grader(cell).get("solution"):
                source = "".join(cell["source"])
                assert source.count("### BEGIN SOLUTION") == source.count("### END SOLUTION") >= 1


CALLS = {
    "check_affine_log_density": ("01_change_of_variables", ["affine_log_density"]),
    "check_affine_coupling": ("02_bijectors_and_models", ["coupling_encode", "coupling_decode"]),
    "check_made_masks": ("02_bijectors_and_models", ["made_masks"]),
    "check_lkd_loss": ("05_lkd", ["my_lkd_loss"]),
    "check_ilkd_loss": ("06_ilkd", ["my_ilkd_loss"]),
    "check_skd_loss": ("07_skd_and_combined", ["my_skd_loss"]),
    "check_norm_preserving_interpolation": ("08_evaluation", ["norm_preserving_interpolation"]),
    "check_selfnorm_gradient": ("09_self_normalizing_flows", ["selfnorm_gradient"]),
}


@pytest.mark.parametrize("check", sorted(CALLS))
def test_the_notebook_solution_passes_its_check(check):
    notebook, names = CALLS[check]
    ns = solutions(notebook)
    errors = getattr(E, check)(*[ns[n] for n in names])
    assert errors and max(errors.values()) < 1e-8


def _wrong_answers():
    """One plausible mistake per exercise, each built from the notebook's own solution."""
    s01, s02 = solutions("01_change_of_variables"), solutions("02_bijectors_and_models")
    s05, s06 = solutions("05_lkd"), solutions("06_ilkd")
    s09 = solutions("09_self_normalizing_flows")
    enc, dec = s02["coupling_encode"], s02["coupling_decode"]

    def masks_off_by_one(deg_in, hidden):  # output i may see degree i: not autoregressive
        return [*s02["made_masks"](deg_in, hidden)[:-1], (deg_in[:, None] >= hidden[-1][None, :]).float()]

    def interp_linear(u, v, alpha):
        return (1 - alpha) * u + alpha * v

    return {
        "log-det with the wrong sign": (E.check_affine_log_density, [
            lambda x, a, b: s01["affine_log_density"](x, a, b) + 2 * torch.linalg.slogdet(a)[1]]),
        "log det A without the absolute value": (E.check_affine_log_density, [  # NaN for a reflection
            lambda x, a, b: s01["affine_log_density"](x, a, b) + torch.linalg.slogdet(a)[1]
            - torch.logdet(a)]),
        "coupling log-det negated": (E.check_affine_coupling, [
            lambda x, n: (enc(x, n)[0], -enc(x, n)[1]), dec]),
        "coupling decode not inverting": (E.check_affine_coupling, [enc, lambda y, n: y]),
        "MADE output mask with >=": (E.check_made_masks, [masks_off_by_one]),
        "LKD teacher not frozen": (E.check_lkd_loss, [
            lambda t, s, x: (s.encode(x).flat() - t.encode(x).flat()).pow(2).mean()]),
        "ILKD pairs swapped": (E.check_ilkd_loss, [
            lambda t, s, x, p: s06["my_ilkd_loss"](t, s, x, [(i, j) for j, i in p])]),
        "ILKD summed, not averaged": (E.check_ilkd_loss, [
            lambda t, s, x, p: s06["my_ilkd_loss"](t, s, x, p) * len(p)]),
        "SKD with independent noise": (E.check_skd_loss, [
            lambda t, s, n: (s.decode(n.flip(0)) - t.decode(n).detach()).abs().mean()]),
        "SKD teacher not frozen": (E.check_skd_loss, [
            lambda t, s, n: (s.decode(n) - t.decode(n)).abs().mean()]),
        "SKD with the squared distance": (E.check_skd_loss, [
            lambda t, s, n: (s.decode(n) - t.decode(n).detach()).pow(2).mean()]),
        "linear interpolation": (E.check_norm_preserving_interpolation, [interp_linear]),
        "exact W^-T with a rough R": (E.check_selfnorm_gradient, [
            lambda w, r, x: s09["selfnorm_gradient"](w, torch.linalg.inv(w), x)]),
        "log-det gradient R instead of R^T": (E.check_selfnorm_gradient, [
            lambda w, r, x: s09["selfnorm_gradient"](w, r.T, x)]),
        "not implemented": (E.check_lkd_loss, [lambda *a: (_ for _ in ()).throw(NotImplementedError())]),
        "wrong LKD distance": (E.check_lkd_loss, [
            lambda t, s, x: s05["my_lkd_loss"](t, s, x).sqrt()]),
    }


@pytest.mark.parametrize("mistake", sorted(_wrong_answers()))
def test_a_wrong_answer_fails_its_check(mistake):
    check, fns = _wrong_answers()[mistake]
    with pytest.raises(AssertionError):
        check(*fns)


# ------------------------------------------------------------------------------------------------
# nbgrader end to end: release, then autograde three students
# ------------------------------------------------------------------------------------------------

WRONG = {  # notebook -> (the solution line, a wrong line): the autograder must take that exercise's points
    "01_change_of_variables": ("return log_pz - torch.linalg.slogdet(A)[1]",
                               "return log_pz + torch.linalg.slogdet(A)[1]"),
    "06_ilkd": ("for j, i in pairs", "for i, j in pairs"),
}


def _write(path: Path, cells_from: Path, replace: tuple[str, str] | None = None) -> None:
    text = cells_from.read_text()
    if replace:
        assert replace[0] in text
        text = text.replace(replace[0], replace[1])
    path.write_text(text)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Build the release, then autograde (in two processes at once) a blank release, the solution
    notebooks, and a student with one wrong answer in 01 and in 06."""
    root = tmp_path_factory.mktemp("course")
    release = build_release(root / "course_a")
    build_release(root / "course_b")
    subs_a, subs_b = root / "subs_a", root / "subs_b"
    for student in ("blank", "solution"):
        (subs_a if student == "blank" else subs_b).joinpath(student).mkdir(parents=True)
    (subs_b / "wrong").mkdir()
    for notebook in E.EXERCISES:
        _write(subs_a / "blank" / f"{notebook}.ipynb", release / f"{notebook}.ipynb")
        _write(subs_b / "solution" / f"{notebook}.ipynb", NOTEBOOKS / f"{notebook}.ipynb")
    for notebook, change in WRONG.items():
        _write(subs_b / "wrong" / f"{notebook}.ipynb", NOTEBOOKS / f"{notebook}.ipynb", change)
    env = {**os.environ, "FLOWLIB_FAST": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "flowlib.course", "grade", str(subs), "--course",
                               str(root / course)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for subs, course in ((subs_a, "course_a"), (subs_b, "course_b"))]
    outputs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    scores = _scores(root / "course_a", ["blank"]) + _scores(root / "course_b", ["solution", "wrong"])
    return root, release, scores, outputs


def test_release_removes_solutions_and_keeps_checks(graded):
    _, release, _, _ = graded
    assert sorted(p.stem for p in release.glob("*.ipynb")) == sorted(E.EXERCISES)
    for notebook, checks in E.EXERCISES.items():
        cells = _cells(release / f"{notebook}.ipynb")
        text = "".join("".join(c["source"]) for c in cells)
        assert "BEGIN SOLUTION" not in text and "raise NotImplementedError()" in text
        assert "torch.linalg.slogdet(A)[1]" not in text or notebook != "01_change_of_variables"
        kept = {_grader(c)["grade_id"] for c in cells if _grader(c).get("grade")}
        assert kept == set(checks)
        assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code")


def test_blank_release_scores_zero_on_every_graded_cell_and_errors_nowhere_else(graded):
    root, _, scores, _ = graded
    blank = [s for s in scores if s.student == "blank"]
    assert {(s.notebook, s.cell) for s in blank} == {(n, c) for n, cs in E.EXERCISES.items() for c in cs}
    assert all(s.score == 0 and s.max_score > 0 for s in blank)
    for notebook in E.EXERCISES:
        cells = _cells(root / "course_a" / "autograded" / "blank" / ASSIGNMENT / f"{notebook}.ipynb")
        for cell in cells:
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            if errors:  # only a graded check may fail, and it fails because the exercise is not done
                where = (notebook, "".join(cell["source"])[:200], errors[0]["ename"])
                assert _grader(cell).get("grade"), where
                assert "not implemented yet" in errors[0]["evalue"]


def test_solutions_score_full_marks(graded):
    _, _, scores, _ = graded
    solution = [s for s in scores if s.student == "solution"]
    assert len(solution) == sum(len(v) for v in E.EXERCISES.values())
    assert all(s.score == s.max_score == E.EXERCISES[s.notebook][s.cell] for s in solution)
    assert sum(s.score for s in solution) == sum(sum(v.values()) for v in E.EXERCISES.values())


def test_wrong_answers_lose_their_points(graded):
    _, _, scores, outputs = graded
    wrong = {(s.notebook, s.cell): s.score for s in scores if s.student == "wrong"}
    assert wrong == {("01_change_of_variables", "check_affine_log_density"): 0.0,
                     ("06_ilkd", "check_ilkd_loss"): 0.0}
    table = score_table([s for s in scores if s.student == "wrong"])
    assert "wrong            total                           0 / 5" in table
    assert "solution" in outputs[1] and "19 / 19" in outputs[1]
