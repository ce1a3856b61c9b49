"""A short check of a CUDA machine at the paper's scale: ``scripts/gpu_check.sh`` (or
``python -m flowlib.gpu_check``).

For every Table 2 / Table 5 model (:func:`flowlib.paper_scale.paper_models`) it builds the model on the
device, runs training steps (negative log-likelihood, AdamW, the paper budget's batch size) on random
inputs of the set's shape for at most ``--seconds`` seconds or ``--steps`` steps, and reports steps/s,
samples/s, the peak memory and the time 10^4 steps would take; then, for the image students, a bf16 training
pass against float32 (the largest per-sample log-likelihood difference in nats per dimension, and the step
time of each). One table at the end. Random inputs are enough to time a step (a flow's cost does not depend
on the values); nothing is downloaded or written. ``--device cpu`` with small ``--max-batch`` and
``--steps`` checks the script itself (the tests do that).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .models import from_preset
from .paper_scale import BUDGETS, paper_models
from .precision import conditioner_precision

__all__ = ["bf16_check", "main", "time_steps"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(flow, batch: int, device: torch.device) -> torch.Tensor:
    """A batch of random inputs of ``flow``'s shape (images: GLOW's model space, pixels - 0.5)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if len(flow.input_shape) == 3:
        return (torch.rand(batch, *flow.input_shape, generator=g) - 0.5).to(device)
    return torch.randn(batch, *flow.input_shape, generator=g).to(device)


def time_steps(m, device: torch.device, steps: int, seconds: float, max_batch: int | None,
               budget: str = "paper") -> dict:
    """Training steps of paper model ``m`` on ``device``: steps/s, samples/s, peak memory (GiB, CUDA)."""
    b = BUDGETS[budget]["tabular" if m.shape else m.dataset]
    batch = b.batch_size if max_batch is None else min(b.batch_size, max_batch)
    torch.manual_seed(0)
    flow = from_preset(m.preset, shape=m.shape).to(device).train()
    x = _inputs(flow, batch, device)
    opt = torch.optim.AdamW(flow.parameters(), lr=b.lr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        loss = -flow.log_prob(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step()  # ActNorm's initialisation and the first allocations are not timed
    _sync(device)
    done, start = 0, time.perf_counter()
    while done < steps and time.perf_counter() - start < seconds:
        loss = step()
        done += 1
    _sync(device)
    took = time.perf_counter() - start
    rate = done / took if took > 0 else float("nan")
    return {"model": m.preset, "dataset": m.dataset, "batch": batch, "steps": done, "steps_per_s": rate,
            "samples_per_s": rate * batch, "hours_for_1e4_steps": 1e4 / rate / 3600 if rate else float("nan"),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "finite": bool(torch.isfinite(loss))}


def bf16_check(m, device: torch.device, batch: int, repeats: int = 5) -> dict:
    """A bf16 training pass of ``m`` against float32: largest |difference| of the per-sample
    log-likelihoods in nats per dimension, and the time of a forward-backward pass in each."""
    torch.manual_seed(0)
    flow = from_preset(m.preset, shape=m.shape).to(device).train()
    x = _inputs(flow, batch, device)
    with torch.no_grad():
        flow.log_prob(x)  # ActNorm's initialisation
        for p in flow.parameters():  # away from the identity start, so the conditioners matter
            p.add_(0.01 * torch.randn_like(p))
    out, times = {}, {}
    for precision in ("fp32", "bf16"):
        with conditioner_precision(precision):
            lp = flow.log_prob(x)
            lp.mean().backward()
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                flow.zero_grad(set_to_none=True)
                flow.log_prob(x).mean().backward()
            _sync(device)
        out[precision], times[precision] = lp.detach(), (time.perf_counter() - start) / repeats
    per_dim = float((out["bf16"] - out["fp32"]).abs().max()) / x[0].numel()
    return {"model": m.preset, "batch": batch, "max_diff_nats_per_dim": per_dim,
            "fp32_ms": 1e3 * times["fp32"], "bf16_ms": 1e3 * times["bf16"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowlib.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (to check the script)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per model, at most")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per model, at most")
    parser.add_argument("--max-batch", type=int, default=None, help="cap the paper's batch sizes")
    parser.add_argument("--models", nargs="*", default=None,
                        help="only the models whose preset or dataset contains one of these words")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; this check is for a GPU machine (--device cpu checks the script)",
              file=sys.stderr)
        return 1
    device = torch.device(args.device)
    models = [m for m in paper_models()
              if not args.models or any(w in m.preset or w == m.dataset for w in args.models)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; {len(models)} model(s), at most {args.steps} steps or "
          f"{args.seconds:g} s each, random inputs of each set's shape")
    rows = []
    for m in models:
        r = time_steps(m, device, args.steps, args.seconds, args.max_batch)
        rows.append(r)
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['model']:<24} {r['dataset']:<10} batch {r['batch']:>6,}  {r['steps']:>4} steps  "
              f"{r['steps_per_s']:>8.2f} steps/s  {r['samples_per_s']:>11,.0f} samples/s  "
              f"10^4 steps: {r['hours_for_1e4_steps']:>7.2f} h  peak {peak} GiB"
              f"{'' if r['finite'] else '  NON-FINITE LOSS'}", flush=True)
    print("bf16 (coupling networks under autocast) against float32, image students:")
    checks = []
    for m in (m for m in models if m.shape is None and m.role == "student"):
        c = bf16_check(m, device, batch=min(32, args.max_batch or 32))
        checks.append(c)
        print(f"{c['model']:<24} batch {c['batch']:>3}  max |log p bf16 - fp32| "
              f"{c['max_diff_nats_per_dim']:.2e} nats/dim  step {c['fp32_ms']:.1f} ms fp32, "
              f"{c['bf16_ms']:.1f} ms bf16", flush=True)
    bad = [r["model"] for r in rows if not r["finite"]] + [c["model"] for c in checks
                                                           if not c["max_diff_nats_per_dim"] < 5e-3]
    print("summary: " + ("all finite, bf16 within 5e-3 nats/dim" if not bad else f"problems: {bad}"))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
