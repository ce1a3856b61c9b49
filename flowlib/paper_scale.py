"""The paper's scale: its datasets, Table 2/5 models and training budgets, checked without training.

``python -m flowlib.paper_scale --dry-run`` (or ``python -m flowlib.run -f configs/paper.yaml --dry-run``)
builds every teacher and student of Tables 2 and 5 from :data:`flowlib.models.PRESETS` for every paper set
of the configuration, prints its parameter count against the paper's, and the number of optimisation steps
and batch size the chosen budget implies; it opens each set's data (or, with ``--synthetic``, a tiny
stand-in of the same shape and type) and runs a batch through the student, so that a missing set gives
its "how to get it" error before anything trains. Nothing is trained.

Budgets (the paper and the official code disagree; both are offered, as named options):

* ``"paper"`` (the default; Sec. 5 of the paper): 10^4 iterations with batches of 65,536 rows and learning
  rate 5e-5 (AdamW) on tabular data; images "the same training parameters ... but with a batch size of 32".
* ``"official"``: ``conf/training/*.yaml`` of ``vklyukin/nf_distillation`` at its last commit: Adam, learning
  rate 5e-4, 10^4 *epochs* of 65,536-row batches on tabular data, 1,000 epochs of 128 (CIFAR-10) or 16
  (CelebA) images. Those files are not evidence of what produced the tables (the same commit's model
  configs give far fewer parameters than Table 2 prints), which is why the paper's text is the default.

Training at this scale goes through the notebooks: their ``scale`` parameter ("paper" or "official", the
budget) makes :func:`flowlib.experiments.teacher_config` and ``student_config`` return :func:`paper_config`'s
runs, and ``python -m flowlib.run -f configs/paper.yaml`` runs notebooks 04-08 and 11 with it.

Image models are counted on PyTorch's ``meta`` device (no memory, no time), so the 44M-parameter image
teachers cost nothing here; the image students also run a batch of two on the CPU.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from .models import PAPER_PARAMS_K, PRESETS, TABULAR_DIMS, count_parameters, from_preset

__all__ = ["BUDGETS", "FAST_STEPS", "IMAGE_SETS", "SCALES", "TABULAR_SETS", "PaperModel", "check_data",
           "check_scale", "dry_run", "main", "paper_config", "paper_models", "plan", "preset_name"]

TABULAR_SETS = ("power", "gas", "hepmass", "miniboone", "bsds300")
IMAGE_SETS = ("cifar10", "celeba")  # each also the prefix of its presets
TRAIN_SIZES = {"cifar10": 50_000, "celeba": 162_770}  # training images (torchvision's splits)

#: the notebooks' ``scale`` parameter: "cpu" runs flowlib.experiments' CPU-sized models on MAGIC and
#: fashion-mnist-16; "paper" and "official" run the paper's sets and Table 2/5 models with the paper's or the
#: official code's budget (:data:`BUDGETS`)
SCALES = ("cpu", "paper", "official")
#: optimisation steps of every run at the paper's scale in fast mode: a smoke test of the whole pipeline
FAST_STEPS = 2


@dataclass(frozen=True)
class Budget:
    iterations: int | None  # optimisation steps, or None when ``epochs`` fixes them
    epochs: int | None
    batch_size: int
    lr: float
    optimizer: str


#: (budget name, data kind or image set) -> Budget; see the module docstring
BUDGETS: dict[str, dict[str, Budget]] = {
    "paper": {"tabular": Budget(10_000, None, 65_536, 5e-5, "AdamW"),
              "cifar10": Budget(10_000, None, 32, 5e-5, "AdamW"),
              "celeba": Budget(10_000, None, 32, 5e-5, "AdamW")},
    "official": {"tabular": Budget(None, 10_000, 65_536, 5e-4, "Adam"),
                 "cifar10": Budget(None, 1_000, 128, 5e-4, "Adam"),
                 "celeba": Budget(None, 1_000, 16, 5e-4, "Adam")},
}


@dataclass(frozen=True)
class PaperModel:
    preset: str  # a flowlib.models.PRESETS name
    dataset: str
    arch: str
    role: str  # "teacher" or "student"

    @property
    def shape(self) -> tuple[int, ...] | None:
        return (TABULAR_DIMS[self.dataset],) if self.dataset in TABULAR_DIMS else None


def paper_models(tabular=TABULAR_SETS, images=IMAGE_SETS, archs=("glow", "maf")) -> list[PaperModel]:
    """Every teacher and student of Table 2 (tabular, GLOW and MAF) and Table 5 (images, GLOW)."""
    unknown = sorted(set(tabular) - set(TABULAR_SETS)) + sorted(set(images) - set(IMAGE_SETS))
    if unknown:
        raise ValueError(f"not a paper set: {unknown}; the paper's sets are {', '.join(TABULAR_SETS)} "
                         f"(tabular) and {', '.join(IMAGE_SETS)} (images)")
    out = [PaperModel(f"tabular-{arch}-{role}", ds, arch, role)
           for arch in archs for ds in tabular for role in ("teacher", "student")]
    out += [PaperModel(f"{ds}-glow-{role}", ds, "glow", role)
            for ds in images for role in ("teacher", "student")]
    return out


def _train_size(dataset: str) -> int:
    if dataset in TRAIN_SIZES:
        return TRAIN_SIZES[dataset]
    from .data_sources import PUBLISHED_SIZES

    return PUBLISHED_SIZES[dataset][0]


def _steps_and_batch(dataset: str, budget: str) -> tuple[int, int, Budget]:
    """Optimisation steps and batch size of ``budget`` on ``dataset`` (a batch never exceeds the set)."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    b = BUDGETS[budget]["tabular" if dataset in TABULAR_DIMS else dataset]
    n = _train_size(dataset)
    batch = min(b.batch_size, n)
    steps = b.iterations if b.iterations is not None else b.epochs * math.ceil(n / batch)
    return steps, batch, b


def plan(model: PaperModel, budget: str = "paper") -> dict:
    """Parameter count (K, LU counted as Table 2 counts it for tabular GLOW) against the paper's, and the
    steps and batch size of ``budget`` for ``model``."""
    steps, batch, b = _steps_and_batch(model.dataset, budget)
    if model.shape is None:  # image models: counted on the meta device (no memory, no time)
        with torch.device("meta"):
            flow = from_preset(model.preset)
    else:  # tabular models are small (MADE's masks need real tensors)
        flow = from_preset(model.preset, shape=model.shape)
    lu = "free" if model.preset.startswith("tabular-glow") else "stored"
    ours = count_parameters(flow, lu=lu) / 1e3
    paper = PAPER_PARAMS_K[model.preset][model.dataset]
    return {"model": model.preset, "dataset": model.dataset, "role": model.role, "params_k": ours,
            "paper_params_k": paper, "off": ours / paper - 1, "steps": steps, "batch_size": batch,
            "lr": b.lr, "optimizer": b.optimizer, "train_rows": _train_size(model.dataset)}


def check_scale(scale: str) -> str:
    """``scale`` itself, or a ``ValueError`` naming the choices."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)} ('cpu': the CPU-sized "
                         f"models on magic and fashion-mnist-16; 'paper' / 'official': the paper's sets and "
                         f"models with the paper's or the official code's budget)")
    return scale


def preset_name(arch: str, dataset: str, role: str) -> str:
    """The :data:`flowlib.models.PRESETS` entry of the paper's ``role`` ("teacher" or "student") for
    ``arch`` on ``dataset``; a ``ValueError`` if ``dataset`` is not one of the paper's sets."""
    if dataset in TABULAR_DIMS:
        return f"tabular-{arch}-{role}"
    if dataset in IMAGE_SETS:
        if arch != "glow":
            raise ValueError(f"the paper's image models are GLOWs; {arch} is for tabular sets only")
        return f"{dataset}-glow-{role}"
    raise ValueError(f"{dataset!r} is not one of the paper's sets ({', '.join(TABULAR_SETS + IMAGE_SETS)}); "
                     f"the paper's scale needs them (scale='cpu' runs the CPU-sized models on magic and "
                     f"fashion-mnist-16)")


def paper_config(arch: str, dataset: str, method: str = "teacher", *, budget: str = "paper",
                 fast: bool = False, seed: int = 0, teacher_seed: int = 0, device: str = "auto",
                 lambdas: tuple | None = None):
    """The :class:`flowlib.train.TrainConfig` of the paper's teacher (``method="teacher"``) or student
    (``"nll"``, ``"lkd"``, ``"ilkd"``, ``"skd"``) for ``arch`` on one of its sets: the Table 2/5 sizes
    (:data:`flowlib.models.PRESETS`) and ``budget``'s steps, batch size, learning rate and optimizer (Adam is
    AdamW without weight decay). The budget is fixed, as in the paper, with 20 validation evaluations along
    the way; the best-validation weights are the ones kept (as the official code keeps its best checkpoint).
    Warm-up is flowlib's 100 steps (the paper states none); SKD decodes as many samples as the batch (the
    official code). ``fast``: the same models and data, :data:`FAST_STEPS` steps (a smoke test)."""
    from .train import TrainConfig

    role = "teacher" if method == "teacher" else "student"
    preset = preset_name(arch, dataset, role)
    sizes = {k: v for k, v in PRESETS[preset].items() if k not in ("arch", "shape")}
    steps, batch, b = _steps_and_batch(dataset, budget)
    steps = FAST_STEPS if fast else steps
    image = dataset in IMAGE_SETS
    name = f"{budget}-{dataset}-{arch}-{role}" + ("" if role == "teacher" else f"-{method}")
    teacher = None
    if role == "student" and method != "nll":
        teacher = paper_config(arch, dataset, "teacher", budget=budget, fast=fast, seed=teacher_seed,
                               device=device)
    return TrainConfig(
        name=name + ("-fast" if fast else ""), arch=arch, model_kwargs=sizes, dataset=dataset, steps=steps,
        batch_size=batch, lr=b.lr, weight_decay=0.0 if b.optimizer == "Adam" else 0.01,
        warmup_steps=min(100, steps // 10), eval_every=max(1, steps // 20),
        eval_batch_size=256 if image else 8192, seed=seed,
        device=device, method="nll" if role == "teacher" else method, lambdas=lambdas, teacher=teacher)


def check_data(tabular=(), images=()) -> None:
    """Open every set the paper-scale run needs (its validation split), so that a missing one raises its
    ``DataNotAvailableError`` ("how to get it") before any training starts."""
    from .data import load

    for dataset in dict.fromkeys([*tabular, *images]):
        load(dataset, "val")


def _stand_in(dataset: str, rows: int = 4) -> torch.Tensor:
    """A tiny synthetic batch shaped and typed like ``dataset``'s data (for CI: no data on disk)."""
    from .data import info

    meta = info(dataset)
    g = torch.Generator().manual_seed(0)
    if meta.kind == "image":
        return torch.randint(0, 256, (rows, *meta.shape), generator=g, dtype=torch.uint8)
    return torch.randn(rows, *meta.shape, generator=g)


def _check_pipeline(model: PaperModel, x: torch.Tensor) -> str:
    """Run two rows of the set's data ``x`` (or its stand-in) through the model: tabular models and image
    students, on the CPU; an image teacher is only counted. Returns what was checked."""
    from .data import to_model_space

    if model.shape is None and model.role == "teacher":
        return "data"
    torch.manual_seed(0)
    flow = from_preset(model.preset, shape=model.shape).eval()
    if model.shape is None:  # uint8 images into GLOW's model space
        y, _ = to_model_space(x[:2], kind="glow", generator=torch.Generator().manual_seed(0))
    else:
        y = x[:2].float()
    with torch.no_grad():
        lp = flow.log_prob(y)
    if lp.shape != (2,) or not bool(torch.isfinite(lp).all()):
        raise RuntimeError(f"{model.preset} on {model.dataset}: log_prob gave {lp}")
    return "data + forward"


def dry_run(tabular=TABULAR_SETS, images=IMAGE_SETS, archs=("glow", "maf"), budget: str = "paper",
            synthetic: bool = False, tolerance: float = 0.03, out=print) -> list[dict]:
    """Build and count every model, plan its budget, check its data pipeline; print one table. Returns
    the rows; raises ``DataNotAvailableError`` (with how to get the set) before anything else if a set
    is missing and ``synthetic`` is False."""
    models = paper_models(tabular, images, archs)
    from .data import load

    # every set opens once, before any model is built: a missing one fails first
    batches = {ds: _stand_in(ds) if synthetic else load(ds, "val")[:4]
               for ds in dict.fromkeys(m.dataset for m in models)}
    rows = []
    for m in models:
        row = plan(m, budget)
        row["checked"] = _check_pipeline(m, batches[m.dataset])
        row["within"] = abs(row["off"]) <= tolerance
        rows.append(row)
    out(f"paper scale, budget {budget!r} ({'synthetic stand-ins' if synthetic else 'the real data'}); "
        f"nothing is trained")
    out(f"{'model':<24} {'dataset':<10} {'params K':>10} {'paper K':>9} {'off':>7} {'steps':>10} "
        f"{'batch':>7} {'checked':<14}")
    for r in rows:
        flag = "" if r["within"] else f"  <- beyond {tolerance:.0%}"
        out(f"{r['model']:<24} {r['dataset']:<10} {r['params_k']:>10.1f} {r['paper_params_k']:>9.1f} "
            f"{r['off']:>+7.1%} {r['steps']:>10,} {r['batch_size']:>7,} {r['checked']:<14}{flag}")
    beyond = [f"{r['model']} on {r['dataset']}" for r in rows if not r["within"]]
    out(f"{len(rows) - len(beyond)} of {len(rows)} parameter counts within {tolerance:.0%} of the paper's"
        + (f"; beyond: {', '.join(beyond)} (see flowlib.models.PRESETS)" if beyond else ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowlib.paper_scale",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", required=True,
                        help="build, count and plan every model; train nothing (training at the paper's "
                             "scale: python -m flowlib.run -f configs/paper.yaml)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="paper")
    parser.add_argument("--synthetic", action="store_true",
                        help="tiny stand-ins of each set instead of its data (no download needed)")
    parser.add_argument("--tabular", nargs="*", default=list(TABULAR_SETS))
    parser.add_argument("--images", nargs="*", default=list(IMAGE_SETS))
    args = parser.parse_args(argv)
    from .data_sources import DataNotAvailableError

    try:
        dry_run(args.tabular, args.images, budget=args.budget, synthetic=args.synthetic)
    except (DataNotAvailableError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
