"""The CPU-scale experiments the notebooks run: teacher and student configurations, fast and full.

Tabular models are the paper's pairs, trained to their validation plateaus (:mod:`flowlib.study`, whose
configurations these are): MAF teacher 6 blocks / student 3 blocks of MADE(2 x 32); GLOW student K = 3,
h = 32 with the official 6-Linear coupling network (Table 2's count) and teacher K = 8, h = 32 (the paper's
K = 5, h = 64 overfits MAGIC and is no better than its student; :data:`flowlib.study.TEACHERS`). Images
(Table 5, read as L levels of K steps): the teacher has 4x the student's steps per level, like the CIFAR-10
pair (K = 32 / 8), at a width a 2-core CPU can train; every image model stops on its validation plateau,
and plain and distilled students share one schedule. ``fast=True`` shrinks everything to seconds: the same
code paths, tiny models.

Every student is distilled from the teacher trained with ``teacher_seed`` (one teacher per dataset and
architecture); students vary ``seed``. :func:`flowlib.train.train_or_load` trains each configuration once
and caches it under the checkpoint folder, so any notebook can ask for any model.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from .data import info
from .paper_scale import check_scale, paper_config
from .study import CAPACITIES, TEACHERS, Budget, Schedule, schedule, study_config
from .train import TrainConfig

__all__ = [
    "METHODS", "METHOD_LABELS", "SIZES", "Budget", "Variant", "budget", "evaluate_runs", "evaluate_variants",
    "main", "student_config", "summarise", "teacher_config", "to_records", "train_image_models",
    "variant_config",
]

METHODS = ("nll", "lkd", "ilkd", "skd")

# (architecture, data kind, role) -> model keyword arguments; "fast" variants are tiny. The tabular entries
# are the paper's pairs as flowlib.study defines them (Table 2's parameter counts).
SIZES = {
    ("maf", "tabular", "teacher"): dict(TEACHERS["maf"]),
    ("maf", "tabular", "student"): dict(CAPACITIES["maf"]["paper"]),
    ("glow", "tabular", "teacher"): dict(TEACHERS["glow"]),
    ("glow", "tabular", "student"): dict(CAPACITIES["glow"]["paper"]),
    ("glow", "image", "teacher"): {"levels": 2, "depth": 8, "hidden": 64},
    ("glow", "image", "student"): {"levels": 2, "depth": 2, "hidden": 64},
}
FAST_SIZES = {
    ("maf", "tabular", "teacher"): {"depth": 4, "hidden": 16},
    ("maf", "tabular", "student"): {"depth": 2, "hidden": 16},
    ("glow", "tabular", "teacher"): {"depth": 2, "hidden": 32, "conditioner": "official"},
    ("glow", "tabular", "student"): {"depth": 2, "hidden": 8, "conditioner": "official"},
    ("glow", "image", "teacher"): {"levels": 2, "depth": 2, "hidden": 16},
    ("glow", "image", "student"): {"levels": 2, "depth": 1, "hidden": 16},
}


def budget(kind: str, role: str, fast: bool) -> Budget:
    """Steps (a cap when the run stops on a validation plateau), batch size and learning rate for a
    tabular/image teacher/student run. Full-scale tabular runs use :func:`flowlib.study.schedule`."""
    if fast:
        # one validation pass, at the end: evaluation dominates a fast run otherwise
        return Budget(steps=40 if kind == "tabular" else 12, batch_size=256 if kind == "tabular" else 32,
                      lr=2e-3, warmup_steps=5, eval_every=40 if kind == "tabular" else 12)
    if kind == "tabular":
        return schedule(role)
    # images: every model stops on its validation plateau (4 evaluations, 2,000 steps, without a better
    # validation bits/dim); the caps only bound a run that never plateaus. Plain and distilled students
    # share one schedule (matched budgets). On fashion-mnist-16 the students plateau near 20k steps: a plain
    # one runs ~25 steps/s on one CPU thread, an ILKD one (with the teacher's forward pass) ~12.
    return Schedule(steps=20_000 if role == "teacher" else 60_000, batch_size=64, lr=1e-3, warmup_steps=200,
                    eval_every=500, patience=4)


def _kind(dataset: str) -> str:
    return info(dataset).kind


def _paper(arch: str, dataset: str, method: str, scale: str, steps: int | None, **kwargs) -> TrainConfig:
    """:func:`flowlib.paper_scale.paper_config` with ``scale`` as its budget, ``steps`` overriding it."""
    config = paper_config(arch, dataset, method, budget=scale, **kwargs)
    return config.replace(steps=steps) if steps else config


def teacher_config(arch: str, dataset: str, *, fast: bool = False, seed: int = 0, device: str = "cpu",
                   steps: int | None = None, scale: str = "cpu") -> TrainConfig:
    """The teacher for ``arch`` ("glow" or "maf") on ``dataset``, trained to its validation plateau.

    Full-scale tabular teachers are :func:`flowlib.study.study_config`'s (the same configuration, so the
    same cached checkpoint as notebook 10's study). ``scale`` "paper" or "official" gives the paper's
    teacher on one of its sets instead (:func:`flowlib.paper_scale.paper_config`, with that budget)."""
    if check_scale(scale) != "cpu":
        return _paper(arch, dataset, "teacher", scale, steps, fast=fast, seed=seed, device=device)
    kind = _kind(dataset)
    sizes = (FAST_SIZES if fast else SIZES).get((arch, kind, "teacher"))
    if sizes is None:
        raise ValueError(f"no {arch} configuration for {kind} data ({dataset}); MAF is for tabular sets only")
    if kind == "tabular" and not fast:
        config = study_config(arch, "teacher", dataset=dataset, device=device, teacher_seed=seed)
        return config.replace(steps=steps) if steps else config
    b = budget(kind, "teacher", fast)
    return TrainConfig(
        name=f"{dataset}-{arch}-teacher{'-fast' if fast else ''}", arch=arch, model_kwargs=dict(sizes),
        dataset=dataset, steps=steps or b.steps, batch_size=b.batch_size, lr=b.lr,
        warmup_steps=b.warmup_steps, eval_every=b.eval_every, seed=seed, device=device, method="nll",
        patience=getattr(b, "patience", None),
    )


def student_config(arch: str, dataset: str, method: str = "nll", *, fast: bool = False, seed: int = 0,
                   teacher_seed: int = 0, device: str = "cpu", steps: int | None = None,
                   lambdas: tuple | None = None, scale: str = "cpu") -> TrainConfig:
    """A student for ``arch`` on ``dataset``: ``method`` "nll" (no distillation), "lkd", "ilkd" or "skd";
    ``scale`` as for :func:`teacher_config`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if check_scale(scale) != "cpu":
        return _paper(arch, dataset, method, scale, steps, fast=fast, seed=seed, teacher_seed=teacher_seed,
                      device=device, lambdas=lambdas)
    kind = _kind(dataset)
    if kind == "tabular" and not fast:  # the study's paper cell: paper capacity, every training row
        config = study_config(arch, method, dataset=dataset, seed=seed, device=device,
                              teacher_seed=teacher_seed)
        return config.replace(**{k: v for k, v in (("steps", steps), ("lambdas", lambdas)) if v is not None})
    sizes = (FAST_SIZES if fast else SIZES)[(arch, kind, "student")]
    b = budget(kind, "student", fast)
    teacher = teacher_config(arch, dataset, fast=fast, seed=teacher_seed, device=device)
    return TrainConfig(
        name=f"{dataset}-{arch}-student-{method}{'-fast' if fast else ''}", arch=arch,
        model_kwargs=dict(sizes), dataset=dataset, steps=steps or b.steps, batch_size=b.batch_size, lr=b.lr,
        warmup_steps=b.warmup_steps, eval_every=b.eval_every, seed=seed, device=device, method=method,
        lambdas=lambdas, teacher=teacher if method != "nll" else None,
        skd_samples=_skd_samples(kind, fast) if method == "skd" else None,
        patience=getattr(b, "patience", None),
    )


def _skd_samples(kind: str, fast: bool) -> int | None:
    """Samples decoded per SKD step: as many as the batch at full scale (the official code), a few in fast
    mode."""
    if not fast:
        return None
    return 32 if kind == "tabular" else 4


def _test_metric(model, dataset: str, seed: int, max_test: int | None = None) -> dict:
    """Test log-likelihood (tabular, nats) or bits/dim (images) with its standard error.

    Every model is scored on the test split it was trained against: training loads the data with the
    default split seed (``flowlib.train``'s ``data_fn``), so the test set must come from that split too,
    whatever the run's seed. (For sets without an official split, a different split seed would put rows of
    the training set into the test set.) ``seed`` only seeds the dequantisation noise of images.
    """
    import torch

    from .bijectors import ImagePreprocess
    from .data import load, to_model_space
    from .metrics import test_bits_per_dim, test_log_likelihood

    x = load(dataset, "test")
    if max_test is not None:
        x = x[:max_test]
    if _kind(dataset) == "tabular":
        mean, se = test_log_likelihood(model, x)
        return {"test_ll": mean, "test_ll_stderr": se, "n_test": len(x)}
    y, _ = to_model_space(x, kind="glow", generator=torch.Generator().manual_seed(seed))
    mean, se = test_bits_per_dim(model, y, preprocess=ImagePreprocess("glow"))
    return {"test_bpd": mean, "test_bpd_stderr": se, "n_test": len(x)}


def evaluate_runs(arch: str, dataset: str, methods, seeds, *, fast: bool = False, device: str = "cpu",
                  checkpoint_root="checkpoints", teacher_seed: int = 0, max_test: int | None = None,
                  progress: bool = True, failures: list | None = None, scale: str = "cpu") -> list[dict]:
    """Train (or load) the teacher and every (method, seed) student; one row of test metrics per model.

    Rows: ``arch, dataset, model ("teacher" or the method), seed, params_k``, ``test_ll`` (tabular) or
    ``test_bpd`` (images) with standard errors, and where training stopped
    (:func:`flowlib.train.convergence`: best and last evaluated step, patience or cap). Teachers are listed
    once, with ``seed = teacher_seed``.
    Given a ``failures`` list, a student run that diverges (:class:`flowlib.train.TrainingDiverged`) is
    recorded there and left out of the rows instead of stopping everything. ``scale``: see
    :func:`teacher_config`.
    """
    from .metrics import parameter_count_k
    from .train import TrainingDiverged, convergence, train_or_load

    rows = []
    teacher_cfg = teacher_config(arch, dataset, fast=fast, seed=teacher_seed, device=device, scale=scale)
    teacher, teacher_history = train_or_load(teacher_cfg, checkpoint_root=checkpoint_root, progress=progress)
    rows.append({"arch": arch, "dataset": dataset, "model": "teacher", "seed": teacher_seed,
                 "params_k": parameter_count_k(teacher), **convergence(teacher_history),
                 **_test_metric(teacher, dataset, teacher_seed, max_test)})
    for method in methods:
        for seed in seeds:
            config = student_config(arch, dataset, method, fast=fast, seed=seed, teacher_seed=teacher_seed,
                                    device=device, scale=scale)
            try:
                student, history = train_or_load(config, checkpoint_root=checkpoint_root, progress=progress)
            except TrainingDiverged as err:
                if failures is None:
                    raise
                failures.append({"arch": arch, "dataset": dataset, "model": method, "seed": seed,
                                 "step": err.step, "error": str(err)})
                continue
            rows.append({"arch": arch, "dataset": dataset, "model": method, "seed": seed,
                         "params_k": parameter_count_k(student), "train_seconds": history[-1]["time"],
                         **convergence(history), **_test_metric(student, dataset, seed, max_test)})
    return rows


@dataclass(frozen=True)
class Variant:
    """A student run that departs from the defaults, for ablations: the method, Eq. 15's weights, and
    multipliers of the default step count and learning rate, and how the distillation weights evolve
    (:meth:`flowlib.train.TrainConfig.lambdas_at`)."""

    method: str = "ilkd"
    lambdas: tuple | None = None
    lambda_schedule: str = "constant"
    steps_factor: float = 1.0
    lr_factor: float = 1.0
    distance: str = "mse"


def variant_config(arch: str, dataset: str, variant: Variant, *, fast: bool = False, seed: int = 0,
                   teacher_seed: int = 0, device: str = "cpu") -> TrainConfig:
    """:func:`student_config` with ``variant``'s changes (another configuration, so its own checkpoint)."""
    import dataclasses

    base = student_config(arch, dataset, variant.method, fast=fast, seed=seed, teacher_seed=teacher_seed,
                          device=device, lambdas=variant.lambdas)
    return dataclasses.replace(base, steps=max(1, round(base.steps * variant.steps_factor)),
                               lr=base.lr * variant.lr_factor, distance=variant.distance,
                               lambda_schedule=variant.lambda_schedule)


def evaluate_variants(arch: str, dataset: str, variants: dict, seeds, *, fast: bool = False,
                      device: str = "cpu", checkpoint_root="checkpoints", teacher_seed: int = 0,
                      progress: bool = True) -> list[dict]:
    """Train (or load) every ``{name: Variant}`` for every seed; rows like :func:`evaluate_runs`' with
    ``model = name`` (add the teacher and plain-student rows from :func:`evaluate_runs` to get gap closures
    from :func:`summarise`)."""
    from .metrics import parameter_count_k
    from .train import train_or_load

    rows = []
    for name, variant in variants.items():
        for seed in seeds:
            config = variant_config(arch, dataset, variant, fast=fast, seed=seed, teacher_seed=teacher_seed,
                                    device=device)
            student, history = train_or_load(config, checkpoint_root=checkpoint_root, progress=progress)
            rows.append({"arch": arch, "dataset": dataset, "model": name, "seed": seed,
                         "params_k": parameter_count_k(student), "train_seconds": history[-1]["time"],
                         "steps": config.steps, "lr": config.lr, "lambdas": list(config.lambdas or ()),
                         "lambda_schedule": config.lambda_schedule,
                         **_test_metric(student, dataset, seed)})
    return rows


METHOD_LABELS = {"teacher": "Teacher", "nll": "Student", "lkd": "LKD Student", "ilkd": "ILKD Student",
                 "skd": "SKD Student"}


def summarise(rows: list[dict], metric: str = "test_ll"):
    """Per (arch, dataset, model): mean, std and count over seeds, and the gap closure of each distilled
    row, ``(distilled - student) / (teacher - student)`` on the means (1 = as good as the teacher)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    grouped = frame.groupby(["arch", "dataset", "model"], sort=False)[metric]
    table = grouped.agg(["mean", "std", "count"]).reset_index()
    table["std"] = table["std"].fillna(0.0)
    closures = []
    for _, r in table.iterrows():
        same = table[(table.arch == r.arch) & (table.dataset == r.dataset)]
        teacher = same[same.model == "teacher"]["mean"]
        student = same[same.model == "nll"]["mean"]
        if r.model in ("teacher", "nll") or teacher.empty or student.empty:
            closures.append(float("nan"))
            continue
        gap = float(teacher.iloc[0] - student.iloc[0])
        closures.append(float((r["mean"] - student.iloc[0]) / gap) if gap != 0 else float("nan"))
    table["gap_closure"] = closures
    table["label"] = table.model.map(METHOD_LABELS)
    return table


def to_records(table) -> list[dict]:
    """A summary table as JSON-ready records: cells that do not apply (NaN, e.g. the gap closure of a
    teacher row) become ``None`` so that every number in a results file is a real, finite measurement."""
    import math

    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in table.to_dict(orient="records")]


# --------------------------------------------------------------------------------------------------
# Training the image models ahead of the notebooks, two at a time
# --------------------------------------------------------------------------------------------------

def _train_one(config: TrainConfig, checkpoint_root: str) -> dict:
    """Train (or load) one configuration on one torch thread; where it stopped and how long it took."""
    import torch

    from .train import convergence, train_or_load

    torch.set_num_threads(1)
    start = time.perf_counter()
    _, history = train_or_load(config, checkpoint_root=checkpoint_root, progress=False)
    return {"name": config.name, "method": config.method, "seed": config.seed,
            "train_seconds": float(history[-1].get("time", 0.0)), "wall_seconds": time.perf_counter() - start,
            **convergence(history)}


def train_image_models(dataset: str = "fashion-mnist-16", methods=("nll", "ilkd"), seeds=(0, 1, 2, 3, 4), *,
                       arch: str = "glow", fast: bool = False, workers: int = 2,
                       checkpoint_root="checkpoints", device: str = "cpu") -> list[dict]:
    """Train (or load) an image teacher and its students, ``workers`` processes at a time (one torch thread
    each), so that notebooks 04-08 find them trained.

    The plain students do not need the teacher, so they train beside it; the distilled students start once
    the teacher is done. These are the configurations the notebooks ask for (:func:`teacher_config`,
    :func:`student_config`), cached in ``checkpoint_root``: an interrupted call resumes from the finished
    and the last saved models. Returns one record per model (teacher first): where it stopped
    (:func:`flowlib.train.convergence`) and its training time."""
    if _kind(dataset) != "image":
        raise ValueError(f"{dataset} is not an image set; tabular models train with python -m flowlib.study")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    root = str(checkpoint_root)
    teacher = teacher_config(arch, dataset, fast=fast, device=device)
    students = [student_config(arch, dataset, m, fast=fast, seed=s, device=device) for m in methods
                for s in seeds]
    alone = [c for c in students if c.teacher is None]  # plain students: no teacher needed
    distilled = [c for c in students if c.teacher is not None]
    if workers == 1:
        return [_train_one(c, root) for c in (teacher, *alone, *distilled)]
    import concurrent.futures as cf
    import multiprocessing

    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        first = pool.submit(_train_one, teacher, root)
        plain = [pool.submit(_train_one, c, root) for c in alone]
        teacher_record = first.result()
        later = [pool.submit(_train_one, c, root) for c in distilled]
        return [teacher_record, *(f.result() for f in plain), *(f.result() for f in later)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flowlib.experiments",
        description="Train the image teacher and students of notebooks 04-08 ahead of them, two at a time.")
    parser.add_argument("--dataset", default="fashion-mnist-16")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=["nll", "ilkd"], choices=METHODS)
    parser.add_argument("--workers", type=int, default=2, help="models trained at once (default 2)")
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    parser.add_argument("--fast", action="store_true", help="the tiny fast-mode models (seconds)")
    args = parser.parse_args(argv)
    from .results import project_path

    start = time.perf_counter()
    records = train_image_models(args.dataset, args.methods, args.seeds, fast=args.fast, workers=args.workers,
                                 checkpoint_root=project_path(args.checkpoint_dir))
    for r in records:
        print(f"{r['name']} seed {r['seed']}: best step {r['best_step']}, last {r['last_step']} "
              f"({r['stopped_by']}), {r['train_seconds']:.0f} s of training")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
