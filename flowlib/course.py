"""Coursework with nbgrader: build the student release of the exercises and grade submissions.

The notebooks in ``notebooks/`` are the solution (source) notebooks: each exercise is a function between
``### BEGIN SOLUTION`` / ``### END SOLUTION`` and a locked, graded cell that checks it
(:mod:`flowlib.exercises`). This module wraps nbgrader's own commands:

* ``python -m flowlib.course release`` (``make exercises``) copies the exercise notebooks into a course
  folder (``build/course`` by default, generated, not committed) and runs ``nbgrader generate_assignment``:
  ``build/course/release/flowlib/`` holds the student notebooks, solutions replaced by
  ``raise NotImplementedError()``, checks kept.
* ``python -m flowlib.course grade SUBMISSIONS`` (``make grade SUBMISSIONS=...``) takes a folder with one
  sub-folder per student holding that student's notebooks, runs ``nbgrader autograde`` on each (notebooks
  execute in fast mode) and prints a score table (also written to ``build/course/scores.csv``).

nbgrader keeps its gradebook (``gradebook.db``) in the course folder; rebuilding the release resets it.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from flowlib.exercises import EXERCISES
from flowlib.results import project_path

__all__ = ["ASSIGNMENT", "Score", "build_release", "grade", "main", "score_table"]

ASSIGNMENT = "flowlib"
# seconds one notebook cell may run under the autograder (fast mode runs each notebook in well under this)
CELL_TIMEOUT = 1800


def _default_course() -> Path:
    return project_path("build/course")


def _api(course: Path):
    """nbgrader's Python API for the course folder ``course`` (``ImportError`` with the install line if
    nbgrader is missing)."""
    try:
        from nbgrader.apps import NbGraderAPI
        from nbgrader.coursedir import CourseDirectory
        from traitlets.config import Config
    except ImportError as error:
        raise ImportError("coursework needs nbgrader: pip install -e '.[course]' (or make setup)") from error
    # nbgrader runs the `alembic` command installed beside this Python; a venv's Python may be run without
    # its bin folder on PATH (the Makefile calls .venv/bin/python directly)
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    config = Config()
    config.CourseDirectory.root = str(course)
    config.Execute.timeout = CELL_TIMEOUT
    # a check that fails must cost its points, not stop the notebook: the later cells still run
    config.Execute.allow_errors = True
    return NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)


def _run(action: str, result: dict) -> None:
    if not result.get("success"):
        raise RuntimeError(f"nbgrader {action} failed:\n{result.get('log', '')}\n{result.get('error', '')}")


def build_release(course: Path | str | None = None, notebooks: list[str] | None = None) -> Path:
    """Copy the exercise notebooks (all of :data:`~flowlib.exercises.EXERCISES`, or ``notebooks``) into
    ``course/source/flowlib`` and generate the student release; returns ``course/release/flowlib``."""
    course = Path(course) if course is not None else _default_course()
    names = notebooks or list(EXERCISES)
    unknown = [n for n in names if n not in EXERCISES]
    if unknown:
        raise ValueError(f"no exercises in {unknown}; notebooks with exercises: {', '.join(EXERCISES)}")
    if course.exists():
        shutil.rmtree(course)  # a fresh gradebook: the release and its checksums belong together
    source = course / "source" / ASSIGNMENT
    source.mkdir(parents=True)
    for name in names:
        shutil.copy2(project_path("notebooks") / f"{name}.ipynb", source / f"{name}.ipynb")
    _run("generate_assignment", _api(course).generate_assignment(ASSIGNMENT, force=True, create=True))
    return course / "release" / ASSIGNMENT


@dataclass(frozen=True)
class Score:
    """One graded cell of one student's notebook."""

    student: str
    notebook: str
    cell: str
    score: float
    max_score: float


def _student_folders(submissions: Path) -> list[Path]:
    if not submissions.is_dir():
        raise FileNotFoundError(f"no submissions folder {submissions}; expected one sub-folder per student, "
                                f"each with that student's notebooks (e.g. {submissions}/alice/05_lkd.ipynb)")
    folders = sorted(p for p in submissions.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"{submissions} has no student sub-folders (e.g. {submissions}/alice/)")
    return folders


def grade(submissions: Path | str, course: Path | str | None = None) -> list[Score]:
    """Autograde every student's notebooks in ``submissions/<student>/*.ipynb`` against the release in
    ``course`` (built by :func:`build_release`); returns one :class:`Score` per graded cell."""
    course = Path(course) if course is not None else _default_course()
    if not (course / "gradebook.db").exists():
        raise FileNotFoundError(f"no course in {course}: build the release first (make exercises)")
    api = _api(course)
    folders = _student_folders(Path(submissions))
    previous = os.environ.get("FLOWLIB_FAST")
    os.environ["FLOWLIB_FAST"] = "1"  # the kernels inherit it: every notebook runs in fast mode
    try:
        for folder in folders:
            _autograde(api, course, folder)
    finally:
        if previous is None:
            del os.environ["FLOWLIB_FAST"]
        else:
            os.environ["FLOWLIB_FAST"] = previous
    return _scores(course, [f.name for f in folders])


def _autograde(api, course: Path, folder: Path) -> None:
    found = [p for p in folder.glob("*.ipynb") if p.stem in EXERCISES]
    if not found:
        raise FileNotFoundError(f"{folder} holds none of the exercise notebooks ({', '.join(EXERCISES)})")
    target = course / "submitted" / folder.name / ASSIGNMENT
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in found:
        shutil.copy2(path, target / path.name)
    _run(f"autograde for {folder.name}", api.autograde(ASSIGNMENT, folder.name, force=True, create=True))


def _scores(course: Path, students: list[str]) -> list[Score]:
    from nbgrader.api import Gradebook, MissingEntry

    rows = []
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        for student in students:
            for notebook in EXERCISES:
                if not (course / "submitted" / student / ASSIGNMENT / f"{notebook}.ipynb").exists():
                    continue  # not handed in (nbgrader still keeps a zero for it)
                try:
                    sub = gradebook.find_submission_notebook(notebook, ASSIGNMENT, student)
                except MissingEntry:
                    continue
                for g in sorted(sub.grades, key=lambda g: g.name):
                    rows.append(Score(student, notebook, g.name, float(g.score), float(g.max_score)))
    return rows


def score_table(scores: list[Score]) -> str:
    """Per student and notebook: points scored out of the maximum, and each student's total."""
    lines = [f"{'student':<16} {'notebook':<28} {'score':>9}"]
    for student in sorted({s.student for s in scores}):
        mine = [s for s in scores if s.student == student]
        for notebook in EXERCISES:
            cells = [s for s in mine if s.notebook == notebook]
            if cells:
                got, top = sum(s.score for s in cells), sum(s.max_score for s in cells)
                lines.append(f"{student:<16} {notebook:<28} {got:>4g} / {top:<3g}")
        lines.append(f"{student:<16} {'total':<28} {sum(s.score for s in mine):>4g} / "
                     f"{sum(s.max_score for s in mine):<3g}")
    return "\n".join(lines)


def _write_csv(scores: list[Score], path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["student", "notebook", "cell", "score", "max_score"])
        writer.writerows([s.student, s.notebook, s.cell, s.score, s.max_score] for s in scores)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowlib.course", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rel = sub.add_parser("release", help="build the student release of the exercises (nbgrader)")
    rel.add_argument("--course", type=Path, default=None, help="course folder (default build/course)")
    gr = sub.add_parser("grade", help="autograde a folder of submissions, one sub-folder per student")
    gr.add_argument("submissions", type=Path)
    gr.add_argument("--course", type=Path, default=None, help="course folder (default build/course)")
    args = parser.parse_args(argv)
    course = args.course or _default_course()
    if args.command == "release":
        release = build_release(course)
        print(f"student release: {release} ({len(list(release.glob('*.ipynb')))} notebooks, "
              f"{sum(sum(v.values()) for v in EXERCISES.values())} points)")
        return 0
    scores = grade(args.submissions, course)
    print(score_table(scores))
    _write_csv(scores, course / "scores.csv")
    print(f"scores per cell: {course / 'scores.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
