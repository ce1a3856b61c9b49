"""The results tables as Markdown, as the README quotes them.

Notebooks 10 and 11 display these tables (so the published notebooks under ``results/notebooks/`` carry
them, and a test checks that every number of the README's result tables appears there); each function takes
what the notebook's results JSON stores.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

__all__ = ["image_markdown", "regime_markdown", "study_table1_markdown", "table2_markdown",
           "verdicts_markdown"]

MODEL_LABELS = {"nll": "Student", "lkd": "LKD Student", "ilkd": "ILKD Student", "skd": "SKD Student",
                "teacher": "Teacher", "ilkd (l1)": "ILKD Student, L1 (paper's text)"}


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or a dash where there is no value (one seed: no interval)."""
    return "–" if value is None else format(value, spec)


def _signed(value: float | None, digits: int = 3) -> str:
    return _fmt(value, f"+.{digits}f")


def study_table1_markdown(table1: list[dict]) -> str:
    """The study's Table 1 (``flowlib.study.paper_table`` rows): test log-likelihood ± 95% half-width."""
    rows = []
    for r in table1:
        steps = r["best_steps"]
        span = f"{min(steps):,}–{max(steps):,}" if len(steps) > 1 else f"{steps[0]:,}"
        rows.append([r["arch"].upper(), MODEL_LABELS.get(r["model"], r["model"]), str(r["n"]),
                     f"{r['test_ll']:.3f} ± {_fmt(r['half_width'], '.3f')}", f"{r['params_k']:.1f}", span,
                     "yes" if r["all_plateaued"] else "no"])
    return _table(["arch", "model", "n", "test LL (nats)", "params (K)", "best steps", "all plateaued"], rows)


def _verdict(cell: dict) -> str:
    if cell["helps"] and not cell.get("helps_holm", cell["helps"]):
        return "helps on its own interval, not after Holm"
    if cell["helps"]:
        return "**helps**"
    return "**hurts**" if cell["hurts"] else "no effect beyond the noise"


def regime_markdown(cells: list[dict]) -> str:
    """Every cell of the study (``flowlib.study.cell_table``): paired difference, gap, closure, Holm p."""
    rows = []
    for c in cells:
        closure = ("n/a" if c["closure"] is None else
                   f"{c['closure']:+.2f} [{_signed(c['closure_low'], 2)}, {_signed(c['closure_high'], 2)}]")
        diff = f"{_signed(c['diff'])} [{_signed(c['diff_low'])}, {_signed(c['diff_high'])}]"
        rows.append([c["arch"].upper(), c["method"].upper(), c["capacity"], f"{round(100 * c['fraction'])}%",
                     str(c["n"]), diff, _fmt(c["gap"], ".3f"), closure, _fmt(c.get("p_holm"), ".2f"),
                     _verdict(c)])
    return _table(["arch", "method", "capacity", "rows", "n", "distilled − plain (nats), 95% CI",
                   "gap (nats)", "gap closure, 95% CI", "Holm p", "verdict"], rows)


def verdicts_markdown(verdicts: list[dict]) -> str:
    """Notebook 11's paired verdicts of each distilled student against the plain student."""
    rows = [[v["arch"].upper(), v["model"], str(v["seeds"]),
             f"{_signed(v['difference'])} [{_signed(v['ci_low'])}, {_signed(v['ci_high'])}]",
             "n/a" if v["gap_closure"] is None else f"{v['gap_closure']:+.2f}", v["verdict"]]
            for v in verdicts]
    return _table(["arch", "method", "n", "distilled − plain (nats), 95% CI", "gap closure", "verdict"], rows)


def table2_markdown(table2: list[dict]) -> str:
    """Notebook 08's Table 2 analogue: parameters and the time of one batch."""
    rows = [[t["arch"].upper(), t["model"], f"{t['params_k']:.1f}",
             f"{t['encode_ms_mean']:.2f} ± {t['encode_ms_std']:.2f}",
             f"{t['decode_ms_mean']:.2f} ± {t['decode_ms_std']:.2f}"] for t in table2]
    return _table(["arch", "model", "params (K)", "encode ms", "decode ms"], rows)


def _bpd_cells(runs: list[dict]) -> list[str]:
    """bits/dim (mean ± std over seeds, or ± 1.96 test SE for one run), per seed, where each run stopped."""
    values = [r["test_bpd"] for r in runs]
    if len(values) == 1:
        stderr = runs[0].get("test_bpd_stderr")
        cell = f"{values[0]:.3f} ± {_fmt(None if stderr is None else 1.96 * stderr, '.3f')} (n=1)"
    else:
        cell = f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"
    stops = "; ".join(f"{r['best_step']:,} / {r['last_step']:,} "
                      f"({'plateau' if r['stopped_by'] == 'patience' else 'cap'})" for r in runs)
    return [cell, ", ".join(f"{v:.3f}" for v in values), stops]


def _runs(rows: list[dict], key: str) -> list[dict]:
    return sorted((r for r in rows if r["model"] == key), key=lambda r: r["seed"])


_BPD_HEAD = ["bits/dim (± std over seeds; teacher ± 1.96 test SE)", "per seed", "stopped (best / last step)"]


def image_markdown(evaluation: dict) -> str:
    """Notebook 08's image rows (Tables 4 and 6 analogue): bits/dim per seed, where each model stopped, FIDs.

    ``evaluation``: notebook 08's results (``image_rows``, ``table4``, ``table6``)."""
    by_label = {label: key for key, label in MODEL_LABELS.items()}
    t6 = {r["model"]: r for r in evaluation["table6"]}
    rows = []
    for r4 in evaluation["table4"]:
        t = t6[r4["model"]]
        rows.append([r4["model"], *_bpd_cells(_runs(evaluation["image_rows"], by_label[r4["model"]])),
                     f"{r4['fid']:.1f}", f"{t['fid_T1.0']:.1f}", f"{t['fid_T0.7']:.1f}"])
    return _table(["model", *_BPD_HEAD, f"FID (n={evaluation['table4'][0].get('fid_n_fake', '?')})",
                   "interp. FID T=1.0", "interp. FID T=0.7"], rows)


def image_students_markdown(image_rows: list[dict]) -> str:
    """Notebook 06's image models (the teacher, then the plain and ILKD students, seed by seed): bits/dim and
    where each one stopped; ``image_rows``: notebook 06's ``image_rows``."""
    return _table(["model", *_BPD_HEAD], [[MODEL_LABELS[key], *_bpd_cells(_runs(image_rows, key))]
                                          for key in ("teacher", "nll", "ilkd") if _runs(image_rows, key)])
