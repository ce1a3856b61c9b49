"""flowlib's own models at the sizes the notebooks use: how fast, how close to the machine (issue 9).

Three parts, each printed as a table:

1. **Teacher vs student** (Table 2 analogue): ``log_prob`` (encode) and ``decode`` of one batch for every
   teacher / student pair of :mod:`flowlib.experiments` (MAF and tabular Glow on MAGIC's D = 10 and the
   patches' D = 63, image Glow on 1 x 32 x 32), teacher and student interleaved within each operation,
   medians. The student / teacher time ratio is
   printed next to the ratio of their flow-step counts: a model whose time is dominated by its steps has
   the two equal.
2. **Image Glow** at the notebook sizes: a training step (batch 64, as the notebooks train) and sampling 64
   images at temperature 0.7.
3. **Achieved GFLOP/s** of a training step (matmul and convolution FLOPs counted by
   ``torch.utils.flop_counter``) against the machine's measured dense float32 matmul peak
   (2048 x 2048, same thread count), for MAF and tabular Glow at D = 63, batch 8192, and the image Glow.

``--compile`` adds the training step with ``torch.compile`` (an opt-in; compilation time printed apart).
Usage::

    python benchmarks/models.py [--threads 1] [--repeats 15] [--compile]
                                [--json results/benchmarks/models.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from flowlib.experiments import SIZES
from flowlib.models import MAF, Glow, count_parameters


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _interleaved_ms(calls: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _initialised(model, x):
    """A model after one training-mode pass (ActNorm's data-dependent initialisation), in eval mode."""
    model.train()
    with torch.no_grad():
        model.log_prob(x)
    return model.eval()


def _steps(model) -> int:
    """Flow steps: MAF blocks, or Glow steps summed over levels."""
    if isinstance(model, MAF):
        return model.depth
    return model.depth * (model.levels if model.image else 1)


def build(arch: str, kind: str, role: str, shape):
    kwargs = SIZES[(arch, kind, role)]
    return MAF(shape[0], **kwargs) if arch == "maf" else Glow(shape, **kwargs)


def teacher_student(repeats: int, batch: int):
    cases = [("maf", "tabular", (10,)), ("maf", "tabular", (63,)), ("glow", "tabular", (10,)),
             ("glow", "tabular", (63,)), ("glow", "image", (1, 32, 32))]
    rows = []
    for arch, kind, shape in cases:
        torch.manual_seed(0)
        n = batch if kind == "tabular" else 64
        x = torch.randn(n, *shape) if kind == "tabular" else torch.rand(n, *shape) - 0.5
        models = {role: _initialised(build(arch, kind, role, shape), x) for role in ("teacher", "student")}
        with torch.inference_mode():
            zs = {role: m.encode(x).z for role, m in models.items()}
            # teacher and student alternate within one operation (drift hits both equally); the operations
            # are timed one after the other, because a decode between two encodes evicts the encode's
            # buffers from the caches, a fixed cost per call that would count twice as much against the
            # student (+5-8% on MAF encode at batch 1024, measured)
            ms = {}
            ms.update(_interleaved_ms({(role, "encode"): (lambda m=m, x=x: m.log_prob(x))
                                       for role, m in models.items()}, repeats))
            ms.update(_interleaved_ms({(role, "decode"): (lambda m=m, z=zs[role]: m.decode(z))
                                       for role, m in models.items()}, repeats))
        step_ratio = _steps(models["student"]) / _steps(models["teacher"])
        for op in ("encode", "decode"):
            ratio = ms[("student", op)] / ms[("teacher", op)]
            rows.append({"arch": arch, "shape": list(shape), "batch": n, "op": op,
                         "teacher_ms": ms[("teacher", op)], "student_ms": ms[("student", op)],
                         "teacher_params": count_parameters(models["teacher"]),
                         "student_params": count_parameters(models["student"]),
                         "teacher_steps": _steps(models["teacher"]),
                         "student_steps": _steps(models["student"]),
                         "time_ratio": ratio, "step_ratio": step_ratio,
                         "ratio_off_by": ratio / step_ratio - 1.0})
    print(f"\n1. teacher vs student, median ms per batch (tabular batch {batch}, images 64), interleaved")
    print(f"{'model':28} {'op':6} {'teacher':>9} {'student':>9} {'time ratio':>10} {'step ratio':>10} "
          f"{'off by':>7}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        name = f"{r['arch']} {shape} ({r['teacher_steps']} vs {r['student_steps']} steps)"
        print(f"{name:28} {r['op']:6} {r['teacher_ms']:9.2f} {r['student_ms']:9.2f} {r['time_ratio']:10.3f} "
              f"{r['step_ratio']:10.3f} {100 * r['ratio_off_by']:+6.1f}%")
    return rows


def _train_step(model, x, optimizer, log_prob=None):
    log_prob = log_prob or model.log_prob

    def step():
        loss = -log_prob(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def image_glow(repeats: int):
    rows = []
    for role in ("teacher", "student"):
        torch.manual_seed(0)
        x = torch.rand(64, 1, 32, 32) - 0.5
        model = _initialised(build("glow", "image", role, (1, 32, 32)), x).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        train_ms = _median_ms(_train_step(model, x, opt), repeats)
        model.eval()
        with torch.inference_mode():
            sample_ms = _median_ms(lambda model=model: model.sample(64, temperature=0.7), repeats)
        rows.append({"role": role, "params": count_parameters(model), "train_step_ms": train_ms,
                     "sample_64_ms": sample_ms, **SIZES[("glow", "image", role)]})
    print("\n2. image Glow on 1x32x32 (notebook sizes): training step at batch 64, sampling 64 at T = 0.7")
    for r in rows:
        size = f"L={r['levels']} K={r['depth']} hidden={r['hidden']} ({r['params'] / 1e3:.0f}K)"
        print(f"{r['role']:8} {size}: "
              f"train step {r['train_step_ms']:.1f} ms, sample {r['sample_64_ms']:.1f} ms")
    return rows


def matmul_peak(repeats: int = 5) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / (_median_ms(lambda: a @ b, repeats) * 1e-3) / 1e9


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def achieved(repeats: int, compile_too: bool):
    peak = matmul_peak()
    cases = [("MAF D=63, 5 blocks, batch 8192", lambda: MAF(63, depth=5, hidden=32), (63,), 8192),
             ("tabular Glow D=63, 5 steps, batch 8192", lambda: Glow((63,), depth=5, hidden=32), (63,), 8192),
             ("image Glow teacher 1x32x32, batch 64", lambda: build("glow", "image", "teacher", (1, 32, 32)),
              (1, 32, 32), 64)]
    rows = []
    for name, make, shape, n in cases:
        torch.manual_seed(0)
        x = torch.randn(n, *shape)
        model = _initialised(make(), x).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        step = _train_step(model, x, opt)
        flops = flops_of(step)
        ms = _median_ms(step, repeats)
        row = {"case": name, "gflop": flops / 1e9, "step_ms": ms, "gflops": flops / (ms * 1e-3) / 1e9,
               "peak_gflops": peak}
        if compile_too:
            compiled = torch.compile(model.log_prob)
            start = time.perf_counter()
            cstep = _train_step(model, x, opt, compiled)
            cstep()
            row["compile_seconds"] = time.perf_counter() - start
            row["compiled_step_ms"] = _median_ms(cstep, repeats)
        rows.append(row)
    print(f"\n3. achieved throughput of a training step (matmul/conv FLOPs); measured fp32 matmul peak "
          f"{peak:.0f} GFLOP/s")
    for r in rows:
        speedup = r["step_ms"] / r["compiled_step_ms"] if "compiled_step_ms" in r else None
        extra = (f"; torch.compile: {r['compiled_step_ms']:.1f} ms ({speedup:.2f}x, "
                 f"compiled in {r['compile_seconds']:.0f} s)" if "compiled_step_ms" in r else "")
        print(f"{r['case']:40} {r['gflop']:6.2f} GFLOP in {r['step_ms']:7.1f} ms = "
              f"{r['gflops']:5.1f} GFLOP/s "
              f"({100 * r['gflops'] / peak:.0f}% of peak){extra}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batch", type=int, default=1024, help="tabular batch for part 1 (notebook 08 uses 1024)")
    p.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd training steps (part 3)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()} "
          f"with {os.cpu_count()} cpus")
    out = {"threads": args.threads, "torch": torch.__version__,
           "machine": f"{platform.machine()} ({os.cpu_count()} cpus)"}
    if 1 in args.parts:
        out["teacher_student"] = teacher_student(args.repeats, args.batch)
    if 2 in args.parts:
        out["image_glow"] = image_glow(args.repeats)
    if 3 in args.parts:
        out["achieved"] = achieved(args.repeats, args.compile)
    if args.json:
        from flowlib.results import atomic_write_json

        out["written"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
