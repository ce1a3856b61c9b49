"""The paper's tabular experiment run to convergence, and the regime map: when does distillation help?

Every model here -- teacher, plain student, distilled student -- trains until its validation NLL stops
improving (``patience`` evaluations without a better value, :class:`flowlib.train.TrainConfig`), and is
evaluated with its best-validation weights. Plain and distilled students share seeds, so each seed gives one
*paired* difference (distilled − plain test log-likelihood); a method helps in a cell only when the 95%
t-interval of that difference over seeds excludes zero (:func:`flowlib.selfnorm_study.paired_interval`).

The regime map varies two things the paper keeps fixed (section 4.2 uses one student per architecture and
every training row):

* **student capacity** -- :data:`CAPACITIES`: the paper's student (``"paper"``: GLOW K = 3 steps of width 32
  with the official 6-Linear conditioner; MAF 3 MADE blocks of width 32), a smaller one and a clearly
  capacity-limited one;
* **training-set size** -- :data:`FRACTIONS` of the training rows (nested subsets,
  :func:`flowlib.train.training_subset`). The teacher is the paper's teacher trained on *every* row: the
  question is what a trained teacher gives a student that sees fewer rows or has less capacity.

Gap closure of a cell is ``mean paired difference / (teacher test LL − plain student mean test LL)``: 1 means
distillation closed the whole gap; its interval is the difference's interval divided by the same gap.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .train import TrainConfig

__all__ = [
    "Budget", "CAPACITIES", "FRACTIONS", "PAPER_TEACHERS", "STUDY_METHODS", "TEACHERS", "Schedule",
    "all_jobs", "cell_table", "evaluate_model", "method_label", "paper_table", "prioritised",
    "regime_summary", "run_study", "schedule", "study_config", "study_jobs",
]

#: Student sizes, largest (the paper's, Table 3 / the official code) first.
CAPACITIES: dict[str, dict[str, dict]] = {
    "glow": {
        "paper": {"depth": 3, "hidden": 32, "conditioner": "official"},
        "small": {"depth": 2, "hidden": 16, "conditioner": "official"},
        "tiny": {"depth": 1, "hidden": 8, "conditioner": "official"},
    },
    "maf": {
        "paper": {"depth": 3, "hidden": 32},
        "small": {"depth": 2, "hidden": 16},
        "tiny": {"depth": 1, "hidden": 8},
    },
}
#: The paper's teachers (Table 2's counts: GLOW K = 5, h = 64 with the official conditioner; MAF 6 blocks of
#: width 32), :data:`flowlib.models.PRESETS`.
PAPER_TEACHERS: dict[str, dict] = {
    "glow": {"depth": 5, "hidden": 64, "conditioner": "official"},
    "maf": {"depth": 6, "hidden": 32},
}
#: The study's teachers. MAF: the paper's. GLOW: the paper's K = 5, h = 64 overfits MAGIC's 15,314 training
#: rows and is no better than its own student when both train to their plateaus (best validation NLL 5.324
#: nats at 2,750 steps; 5.384 with seed 1, 5.390 with lr 1e-3, 5.433 with lr 5e-4; one plain K = 3, h = 32
#: student reached 5.275). A teacher its student can match is not a teacher, so the GLOW teacher is the best
#: of a small grid on validation: K = 8 steps of width 32 (5.113; K = 5, h = 32: 5.273; test LL -5.013
#: against -5.227 for the paper's size). One run each (seed 0 unless stated), measured when this study was
#: set up.
TEACHERS: dict[str, dict] = {
    "glow": {"depth": 8, "hidden": 32, "conditioner": "official"},
    "maf": dict(PAPER_TEACHERS["maf"]),
}
FAST_TEACHERS = {"glow": {"depth": 2, "hidden": 16, "conditioner": "official"},
                 "maf": {"depth": 2, "hidden": 16}}
FAST_CAPACITIES = {arch: {name: {**kw, "depth": 1, "hidden": 4 if name == "tiny" else 8}
                          for name, kw in caps.items()} for arch, caps in CAPACITIES.items()}
FRACTIONS = (0.1, 0.3, 1.0)
#: Methods of the paper's Table 1 per architecture (the paper has no SKD row for MAF).
STUDY_METHODS = {"glow": ("nll", "lkd", "ilkd", "skd"), "maf": ("nll", "lkd", "ilkd")}


@dataclass(frozen=True)
class Budget:
    """Training budget of one run."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_every: int


@dataclass(frozen=True)
class Schedule(Budget):
    """A :class:`Budget` whose ``steps`` is a cap: training stops earlier once validation has not improved
    for ``patience`` evaluations."""

    patience: int = 8


def schedule(role: str, fast: bool = False) -> Schedule:
    """Training to convergence on MAGIC-sized tabular data (batches of 512 rows, AdamW 2e-3, evaluation every
    250 steps, stop after 8 evaluations without improvement, i.e. 2,000 steps). The caps are there only to
    bound a run: a run that reaches its cap is reported as not plateaued. They are outside a run's identity
    (:func:`flowlib.train.config_hash`), so raising one extends the runs that stopped at it: the students'
    was 30,000 until two GLOW ILKD students were found still improving there."""
    if fast:
        return Schedule(steps=60, batch_size=256, lr=2e-3, warmup_steps=5, eval_every=20, patience=2)
    return Schedule(steps=40_000 if role == "teacher" else 60_000, batch_size=512, lr=2e-3, warmup_steps=200,
                    eval_every=250, patience=8)


def _fraction_tag(fraction: float) -> str:
    return f"f{round(100 * fraction):03d}"


def study_config(arch: str, method: str = "nll", *, capacity: str = "paper", fraction: float = 1.0,
                 seed: int = 0, dataset: str = "magic", fast: bool = False, distance: str = "mse",
                 device: str = "cpu", teacher_seed: int = 0) -> TrainConfig:
    """One model of the study: ``method="teacher"`` for the teacher (all rows, ``teacher_seed``), else a
    student of ``capacity`` trained on ``fraction`` of the rows with ``method`` ("nll", "lkd", "ilkd",
    "skd"), distilled from that teacher."""
    if arch not in CAPACITIES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(CAPACITIES)}")
    caps = (FAST_CAPACITIES if fast else CAPACITIES)[arch]
    if method != "teacher" and capacity not in caps:
        raise ValueError(f"unknown capacity {capacity!r}; choose one of {', '.join(caps)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    suffix = "-fast" if fast else ""
    t = schedule("teacher", fast)
    teacher = TrainConfig(
        name=f"study-{dataset}-{arch}-teacher{suffix}", arch=arch,
        model_kwargs=dict((FAST_TEACHERS if fast else TEACHERS)[arch]), dataset=dataset, steps=t.steps,
        batch_size=t.batch_size, lr=t.lr, warmup_steps=t.warmup_steps, eval_every=t.eval_every,
        seed=teacher_seed,
        device=device, method="nll", patience=t.patience,
    )
    if method == "teacher":
        return teacher
    if method not in ("nll", "lkd", "ilkd", "skd"):
        choices = "nll, lkd, ilkd, skd"
        raise ValueError(f"unknown method {method!r} for {arch}; choose one of {choices}")
    s = schedule("student", fast)
    return TrainConfig(
        name=f"study-{dataset}-{arch}-{capacity}-{_fraction_tag(fraction)}-{method}{suffix}", arch=arch,
        model_kwargs=dict(caps[capacity]), dataset=dataset, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
        warmup_steps=s.warmup_steps, eval_every=s.eval_every, seed=seed, device=device, method=method,
        teacher=teacher if method != "nll" else None, patience=s.patience, train_fraction=fraction,
        distance=distance,
    )


def study_jobs(arch: str, seeds: Sequence[int], map_seeds: Sequence[int], *, fractions=FRACTIONS,
               capacities: Iterable[str] | None = None, map_methods: Sequence[str] = ("nll", "ilkd"),
               fast: bool = False) -> list[dict]:
    """Every run of one architecture: each (capacity, fraction) cell of the regime map with ``map_methods``
    and ``map_seeds``; in the paper's cell (paper capacity, all rows) every method of :data:`STUDY_METHODS`
    (plain, LKD, ILKD and SKD where defined) runs with ``seeds`` (the paper's tables, more seeds)."""
    capacities = list(capacities or (FAST_CAPACITIES if fast else CAPACITIES)[arch])
    jobs = []
    for capacity in capacities:
        for fraction in fractions:
            paper_cell = capacity == "paper" and fraction == 1.0
            methods = STUDY_METHODS[arch] if paper_cell else map_methods
            for method in methods:
                for seed in (seeds if paper_cell else map_seeds):
                    jobs.append({"arch": arch, "method": method, "capacity": capacity, "fraction": fraction,
                                 "seed": seed})
    return jobs


def all_jobs(archs: Sequence[str], seeds: Sequence[int], map_seeds: Sequence[int], *, fractions=FRACTIONS,
             distance_ablation: bool = True, fast: bool = False) -> list[dict]:
    """Every student run of the study (notebook 10 and ``python -m flowlib.study``): :func:`study_jobs` for
    each architecture and, with ``distance_ablation``, ILKD with the paper's L1 distance on the paper's cell
    (``map_seeds``), next to the official code's MSE."""
    jobs = []
    for arch in archs:
        jobs += study_jobs(arch, seeds, map_seeds, fractions=fractions, fast=fast)
        if distance_ablation:
            jobs += [{"arch": arch, "method": "ilkd", "capacity": "paper", "fraction": 1.0, "seed": s,
                      "distance": "l1"} for s in map_seeds]
    return jobs


def prioritised(jobs: Sequence[dict], first_seeds: int = 3) -> list[dict]:
    """``jobs`` in the order that makes an interrupted study most useful: plain and ILKD students of every
    cell with the first ``first_seeds`` seeds (the regime map), then the rest (more seeds of the paper's cell,
    its other methods), each group ordered by seed."""
    rank = {"nll": 0, "ilkd": 1, "skd": 2, "lkd": 3}

    def key(job):
        seeds_rank = 0 if job["seed"] < first_seeds else 1
        core = 0 if job["method"] in ("nll", "ilkd") and job.get("distance", "mse") == "mse" else 1
        return (seeds_rank + core, job["seed"], rank.get(job["method"], 9), job["arch"])

    return sorted(jobs, key=key)


def evaluate_model(model, dataset: str = "magic", reference=None) -> dict:
    """Test log-likelihood (nats, mean over the test rows) with its standard error; with a ``reference``
    model (the teacher), also the mean and standard error of the per-row difference reference − model on
    the same rows (``teacher_margin``), which is how sure we are that the teacher is better."""
    from .data import load
    from .metrics import eval_mode

    x = load(dataset, "test")
    with torch.inference_mode(), eval_mode(model):
        ll = model.log_prob(x).double()
        out = {"test_ll": float(ll.mean()), "test_ll_stderr": float(ll.std() / math.sqrt(len(ll))),
               "n_test": len(ll)}
        if reference is not None:
            with eval_mode(reference):
                d = reference.log_prob(x).double() - ll
            out["teacher_margin"] = float(d.mean())
            out["teacher_margin_stderr"] = float(d.std() / math.sqrt(len(d)))
    return out


def _run_job(job: dict, fast: bool, checkpoint_root: str, threads: int = 1) -> dict:
    from .models import count_parameters
    from .train import convergence, train_or_load

    torch.set_num_threads(threads)
    config = study_config(job["arch"], job["method"], capacity=job.get("capacity", "paper"),
                          fraction=job.get("fraction", 1.0), seed=job.get("seed", 0), fast=fast,
                          distance=job.get("distance", "mse"))
    model, history = train_or_load(config, checkpoint_root=checkpoint_root, progress=False)
    reference = None
    if job["method"] == "nll":
        reference, _ = train_or_load(study_config(job["arch"], "teacher", fast=fast),
                                     checkpoint_root=checkpoint_root, progress=False)
    # free parameters (an LU layer counted as D^2 values), the convention of the paper's Table 2
    return {**job, "params_k": count_parameters(model, lu="free") / 1000,
            "train_seconds": history[-1]["time"], **convergence(history),
            **evaluate_model(model, config.dataset, reference)}


def run_study(jobs: Sequence[dict], *, fast: bool = False, checkpoint_root: str | os.PathLike = "checkpoints",
              workers: int = 1, progress: bool = True,
              rows_path: str | os.PathLike | None = None) -> list[dict]:
    """Train (or load) every job's teacher, then every job, ``workers`` processes at a time (one torch thread
    each); one row per job: the job, parameter count, training seconds, convergence
    (:func:`flowlib.train.convergence`) and test metrics (:func:`evaluate_model`). Finished models are
    loaded from ``checkpoint_root``, so an interrupted study resumes where it stopped. With ``rows_path``
    the rows finished so far are written there (atomically, JSON) after every run."""
    from tqdm.auto import tqdm

    from .results import atomic_write_json

    root = str(checkpoint_root)
    teachers = sorted({j["arch"] for j in jobs})
    all_jobs = [{"arch": a, "method": "teacher", "capacity": "teacher", "fraction": 1.0, "seed": 0}
                for a in teachers] + list(jobs)
    rows: list[dict] = []
    bar = tqdm(total=len(all_jobs), desc="study runs", disable=not progress)
    if workers <= 1:
        for job in all_jobs:
            rows.append(_run_job(job, fast, root))
            bar.update(1)
            if rows_path is not None:
                atomic_write_json(rows_path, rows)
    else:
        import concurrent.futures as cf
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            # the teachers first: every distilled student needs one
            first = [pool.submit(_run_job, j, fast, root) for j in all_jobs[:len(teachers)]]
            for f in first:
                rows.append(f.result())
                bar.update(1)
            futures = [pool.submit(_run_job, j, fast, root) for j in all_jobs[len(teachers):]]
            for f in cf.as_completed(futures):
                rows.append(f.result())
                bar.update(1)
                if rows_path is not None:
                    atomic_write_json(rows_path, rows)
    bar.close()
    def ident(j):
        return (j["arch"], j["method"], j["capacity"], j["fraction"], j["seed"], j.get("distance", "mse"))

    key = [ident(j) for j in all_jobs]
    rows.sort(key=lambda r: key.index(ident(r)))
    return rows


def _teacher_ll(rows: Sequence[dict], arch: str) -> float:
    teacher = [r for r in rows if r["arch"] == arch and r["method"] == "teacher"]
    if not teacher:
        raise ValueError(f"no teacher row for {arch}")
    return teacher[0]["test_ll"]


def cell_table(rows: Sequence[dict], level: float = 0.95) -> list[dict]:
    """One record per (arch, capacity, fraction, distilled method): the plain student's mean test LL, the
    teacher's, the paired difference distilled − plain over the seeds both have (mean, 95% t-interval), the
    gap closure with its interval, and ``helps`` (the interval is above zero) / ``hurts`` (below). Each cell's
    interval is a 95% one on its own; ``p_value`` is its paired t-test and ``p_holm`` that p adjusted by
    Holm's method over every cell of the table, so ``helps_holm`` (``p_holm < 1 - level``, difference above
    zero) keeps the chance of any false "helps" in the whole table below 5%."""
    from .metrics import holm_adjusted, paired_interval, paired_p_value

    out = []
    cells = sorted({(r["arch"], r["capacity"], r["fraction"]) for r in rows if r["method"] != "teacher"},
                   key=lambda c: (c[0], list(CAPACITIES[c[0]]).index(c[1]) if c[1] in CAPACITIES[c[0]] else 9,
                                  c[2]))
    for arch, capacity, fraction in cells:
        same = [r for r in rows if (r["arch"], r["capacity"], r["fraction"]) == (arch, capacity, fraction)]
        plain = {r["seed"]: r["test_ll"] for r in same if r["method"] == "nll"}
        if not plain:
            continue
        teacher = _teacher_ll(rows, arch)
        plain_mean = sum(plain.values()) / len(plain)
        gap = teacher - plain_mean
        for method in dict.fromkeys(method_label(r) for r in same if r["method"] != "nll"):
            treated = {r["seed"]: r["test_ll"] for r in same if method_label(r) == method}
            seeds = sorted(set(plain) & set(treated))
            if not seeds:
                continue
            ci = paired_interval([plain[s] for s in seeds], [treated[s] for s in seeds], level)

            def scale(v, gap=gap):
                return None if v is None or gap <= 0 else v / gap

            out.append({
                "arch": arch, "capacity": capacity, "fraction": fraction, "method": method, "n": ci["n"],
                "plain_mean": plain_mean, "distilled_mean": plain_mean + ci["mean"], "teacher": teacher,
                "gap": gap, "diff": ci["mean"], "diff_low": ci["low"], "diff_high": ci["high"],
                "closure": scale(ci["mean"]), "closure_low": scale(ci["low"]),
                "closure_high": scale(ci["high"]),
                "helps": ci["low"] is not None and ci["low"] > 0,
                "hurts": ci["high"] is not None and ci["high"] < 0,
                "p_value": paired_p_value(ci),
            })
    tested = [c for c in out if c["p_value"] is not None]
    for c, p in zip(tested, holm_adjusted([c["p_value"] for c in tested])):
        c["p_holm"] = p
    for c in out:
        c.setdefault("p_holm", None)
        c["helps_holm"] = c["p_holm"] is not None and c["p_holm"] < 1 - level and c["diff"] > 0
    return out


def method_label(row: dict) -> str:
    """``"ilkd"``, or ``"ilkd (l1)"`` for a run with the paper's L1 distance instead of the default MSE."""
    distance = row.get("distance", "mse")
    return row["method"] if distance == "mse" else f"{row['method']} ({distance})"


def regime_summary(cells: Sequence[dict]) -> list[str]:
    """Plain sentences from :func:`cell_table`'s records: per architecture and method, in how many cells the
    paired 95% interval is above zero (helps), below (hurts), or contains zero, and where it helps."""
    lines = []
    for arch in dict.fromkeys(c["arch"] for c in cells):
        for method in dict.fromkeys(c["method"] for c in cells if c["arch"] == arch):
            sel = [c for c in cells if c["arch"] == arch and c["method"] == method]
            helps = [c for c in sel if c["helps"]]
            hurts = [c for c in sel if c["hurts"]]
            where = ", ".join(f"{c['capacity']} student on {round(100 * c['fraction'])}% of the rows "
                              f"(closure {c['closure']:.2f})" if c["closure"] is not None else
                              f"{c['capacity']} student on {round(100 * c['fraction'])}% of the rows"
                              for c in helps)
            text = (f"{arch.upper()} {method.upper()}: helps in {len(helps)} of {len(sel)} cells"
                    + (f" ({where})" if helps else "") + f", hurts in {len(hurts)}, "
                    f"no effect beyond the noise in {len(sel) - len(helps) - len(hurts)}.")
            lines.append(text)
    tested = [c for c in cells if c.get("p_holm") is not None]
    if tested:
        kept = [f"{c['arch'].upper()} {c['method'].upper()}, {c['capacity']} student on "
                f"{round(100 * c['fraction'])}% of the rows" for c in tested if c["helps_holm"]]
        where = f" ({'; '.join(kept)})" if kept else ""
        lines.append(f"All methods and cells together ({len(tested)} paired comparisons, Holm's correction "
                     f"for the family-wise error at 5%): helps in {len(kept)}{where}.")
    return lines


def paper_table(rows: Sequence[dict], level: float = 0.95) -> list[dict]:
    """Table 1's analogue from the paper's cell (paper capacity, all rows): per arch and model, the mean test
    LL over seeds with its 95% t-interval half-width, the parameter count, and the stopping steps."""
    from scipy import stats

    out = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        labels = dict.fromkeys(["nll", "lkd", "ilkd", "skd"] + [method_label(r) for r in rows] + ["teacher"])
        for method in labels:
            sel = [r for r in rows if r["arch"] == arch and method_label(r) == method
                   and (method == "teacher" or (r["capacity"] == "paper" and r["fraction"] == 1.0))]
            if not sel:
                continue
            values = [r["test_ll"] for r in sel]
            n = len(values)
            mean = sum(values) / n
            if n > 1:
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
                half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
            else:  # one model (the teacher): the test-set standard error instead
                half = 1.96 * sel[0]["test_ll_stderr"]
            out.append({"arch": arch, "model": method, "n": n, "test_ll": mean, "half_width": half,
                        "params_k": sel[0]["params_k"], "best_steps": [r["best_step"] for r in sel],
                        "last_steps": [r["last_step"] for r in sel],
                        "all_plateaued": all(r["plateaued"] for r in sel)})
    return out


def main(argv=None) -> int:
    """``python -m flowlib.study``: train (or load) the study's models and write their rows as JSON."""
    import argparse
    import time

    from .results import atomic_write_json

    parser = argparse.ArgumentParser(prog="python -m flowlib.study", description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["glow", "maf"], choices=sorted(CAPACITIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                        help="seeds of the paper's cell (paper capacity, every row)")
    parser.add_argument("--map-seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="seeds of the other regime-map cells")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    parser.add_argument("--rows", default="runs/study_rows.json",
                        help="where the rows are written (notebook 10 tables the committed ones)")
    parser.add_argument("--no-distance-ablation", action="store_true",
                        help="leave out ILKD with the paper's L1 distance")
    parser.add_argument("--fast", action="store_true", help="tiny models and few steps (a smoke test)")
    args = parser.parse_args(argv)
    from .results import project_path

    jobs = all_jobs(args.archs, args.seeds, args.map_seeds, distance_ablation=not args.no_distance_ablation,
                    fast=args.fast)
    start = time.perf_counter()
    rows = run_study(prioritised(jobs, len(args.map_seeds)), fast=args.fast,
                     checkpoint_root=project_path(args.checkpoint_dir), workers=args.workers,
                     rows_path=project_path(args.rows))
    atomic_write_json(project_path(args.rows), rows)
    print(f"{len(rows)} runs in {time.perf_counter() - start:.0f} s -> {args.rows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
