"""How much does distillation add to a student's training step?

For each model pair, times (after warm-up):

* a plain student training step (NLL only: encode, backward, AdamW step),
* a distilled student step for LKD / ILKD (Eq. 12-13, 15) and SKD (Eq. 14-15, with ILKD),
* one teacher forward (``encode`` under ``no_grad``) and one teacher decode of a batch of noise.

The repeats are interleaved (one of each per round) and summarised by their minimum by default, the
figure least disturbed by other processes on a shared CPU (``--stat median`` for the median).

The overhead of a distilled step over the plain step is compared with its budget: one teacher forward
for LKD / ILKD, one teacher forward plus one teacher decode for SKD. SKD also decodes the *student* and
back-propagates through that decode, so its overhead is expected to exceed the budget by about that much;
the student decode + backward is printed for reference.

Usage: ``python benchmarks/distill_overhead.py [--repeats 30] [--threads 1] [--device cpu] [--json out]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from flowlib.distill import distillation_loss, freeze
from flowlib.models import MAF, Glow
from flowlib.train import resolve_device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_fn(teacher, student, x, method, optimizer, generator):
    def step():
        out = distillation_loss(teacher if method != "nll" else None, student, x, method=method,
                                generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        optimizer.step()
    return step


def _no_grad(fn, arg):
    def run():
        with torch.no_grad():
            fn(arg)
    return run


def _decode_backward(student, noise):
    def run():
        student.sample(temperature=0.7, noise=noise).abs().mean().backward()
        student.zero_grad(set_to_none=True)
    return run


def _cases(batch_tab: int, batch_img: int):
    d = 10
    yield ("tabular MAF D=10: teacher 6 blocks, student 3", lambda: MAF(d, depth=6, hidden=32),
           lambda: MAF(d, depth=3, hidden=32), (batch_tab, d))
    yield ("tabular GLOW D=10: teacher 6 steps h64, student 3 steps h32",
           lambda: Glow((d,), depth=6, hidden=64), lambda: Glow((d,), depth=3, hidden=32), (batch_tab, d))
    yield ("image GLOW 3x16x16 L=2: teacher K=8, student K=2 (h64)",
           lambda: Glow((3, 16, 16), levels=2, depth=8, hidden=64),
           lambda: Glow((3, 16, 16), levels=2, depth=2, hidden=64), (batch_img, 3, 16, 16))


def measure(repeats: int, warmup: int, device: torch.device, batch_tab: int, batch_img: int,
            stat: str = "min") -> list[dict]:
    rows = []
    for name, make_teacher, make_student, shape in _cases(batch_tab, batch_img):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(shape, generator=g) - 0.5) if len(shape) == 4 else torch.randn(shape, generator=g)
        x = x.to(device)
        teacher = make_teacher().to(device)
        with torch.no_grad():
            teacher.train()
            teacher.encode(x)  # ActNorm data-dependent initialisation, as after training
        freeze(teacher)
        n = shape[0]
        noise = teacher.sample_noise(n, torch.Generator().manual_seed(1))
        fns = {"teacher forward": _no_grad(teacher.encode, x),
               "teacher decode": _no_grad(lambda z, t=teacher: t.sample(temperature=0.7, noise=z), noise)}
        students = {}
        for method in ("nll", "lkd", "ilkd", "skd"):
            torch.manual_seed(1)
            student = make_student().to(device).train()
            opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
            students[method] = student
            gen = torch.Generator().manual_seed(2)
            fns[f"step {method}"] = _step_fn(teacher, student, x, method, opt, gen)
        fns["student decode+backward"] = _decode_backward(students["nll"], noise)
        times = {k: [] for k in fns}
        for r in range(warmup + repeats):
            for key, fn in fns.items():
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                if r >= warmup:
                    times[key].append(time.perf_counter() - t0)
        reduce = min if stat == "min" else statistics.median
        med = {k: 1000 * reduce(v) for k, v in times.items()}
        for method in ("lkd", "ilkd", "skd"):
            overhead = med[f"step {method}"] - med["step nll"]
            budget = med["teacher forward"] + (med["teacher decode"] if method == "skd" else 0.0)
            rows.append({
                "case": name, "method": method, "plain_step_ms": med["step nll"],
                "distilled_step_ms": med[f"step {method}"], "overhead_ms": overhead,
                "teacher_forward_ms": med["teacher forward"], "teacher_decode_ms": med["teacher decode"],
                "student_decode_backward_ms": med["student decode+backward"], "budget_ms": budget,
                "step_ratio": med[f"step {method}"] / med["step nll"],
                "overhead_over_budget": overhead / budget,
                "within_budget": overhead <= budget,
                # what the overhead should be: the budget, plus the student's decode and its backward (SKD)
                "accounted_ms": budget + (med["student decode+backward"] if method == "skd" else 0.0),
            })
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on shared CPUs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-tabular", type=int, default=512)
    p.add_argument("--batch-image", type=int, default=16)
    p.add_argument("--stat", choices=("min", "median"), default="min",
                   help="summary of the repeats (min: least disturbed by other processes on a shared CPU)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = measure(args.repeats, args.warmup, device, args.batch_tabular, args.batch_image, args.stat)
    print(f"device={device}, threads={args.threads}, repeats={args.repeats}, batch tabular="
          f"{args.batch_tabular}, image={args.batch_image}; times in ms ({args.stat} over repeats)")
    last = None
    for r in rows:
        if r["case"] != last:
            print(f"\n{r['case']}")
            print(f"  plain student step {r['plain_step_ms']:.2f} | teacher forward "
                  f"{r['teacher_forward_ms']:.2f} | teacher decode {r['teacher_decode_ms']:.2f} | "
                  f"student decode+backward {r['student_decode_backward_ms']:.2f}")
            last = r["case"]
        budget = "teacher fwd + teacher dec" if r["method"] == "skd" else "teacher fwd"
        print(f"  {r['method']:>4}: step {r['distilled_step_ms']:8.2f}  x{r['step_ratio']:.2f} of plain  "
              f"overhead {r['overhead_ms']:7.2f} vs {budget} {r['budget_ms']:7.2f}  "
              f"({r['overhead_over_budget']:.2f}x) -> {'within' if r['within_budget'] else 'OVER'}"
              + (f"; with student decode+backward {r['accounted_ms']:.2f} "
                 f"({r['overhead_ms'] / r['accounted_ms']:.2f}x)" if r["method"] == "skd" else ""))
    if args.json:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.json)), suffix=".part")
        with os.fdopen(fd, "w") as fh:
            json.dump(rows, fh, indent=2)
        os.replace(tmp, args.json)
    return rows


if __name__ == "__main__":
    main()
