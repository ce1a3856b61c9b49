"""flowlib's image GLOW against normflows' multiscale Glow at equal size (issue 17, item 2).

Cases: the notebooks' image models on fashion-mnist-16 (1 x 16 x 16, L = 2 levels, teacher K = 8 and student
K = 2 steps per level, 64 hidden channels) and a CIFAR-like 3 x 32 x 32 model (L = 3, K = 8, 128 channels).
normflows builds the same multi-scale architecture from its parts (``GlowBlock`` = affine coupling with a
3x3 / 1x1 / 3x3 convolutional network, LU 1x1 convolution and ActNorm; ``Squeeze``; ``Merge``;
``MultiscaleFlow``), as its Glow example does; its split-off halves get a learned per-level Gaussian
(``GlowBase``) where flowlib's get a learned conditional prior, so the parameter counts (printed) differ by a
few percent. Times, interleaved in one process (one call of each library per round, in a new random order
every round), medians over ``--repeats`` rounds:

* a training step at batch ``--batch`` (``-log_prob(x).mean()``, backward, Adam step),
* sampling ``--batch`` images at temperature 0.7 (eval mode, no gradients).

Usage::

    python benchmarks/image_peers.py [--threads 2] [--repeats 9] [--batch 64] [--json results/benchmarks/...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics

import torch
from peers import interleaved  # benchmarks/peers.py: seeded random order every round

from flowlib.models import Glow

CASES = {  # name: (shape, levels, depth, hidden)
    "fashion-mnist-16 teacher": ((1, 16, 16), 2, 8, 64),
    "fashion-mnist-16 student": ((1, 16, 16), 2, 2, 64),
    "CIFAR-like": ((3, 32, 32), 3, 8, 128),
}


def normflows_glow(shape, levels: int, depth: int, hidden: int):
    """normflows' multiscale Glow with flowlib's layout: level ``i`` squeezes, runs ``depth`` GlowBlocks and
    (but for the last) sends half of its channels to the prior."""
    import normflows as nf

    c, h, w = shape
    q0, flows, merges = [], [], []
    for i in range(levels):
        channels = c * 2 ** (levels + 1 - i)
        flows.append([nf.flows.GlowBlock(channels, hidden, split_mode="channel", scale=True)
                      for _ in range(depth)] + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
        else:
            latent = (c * 2 ** (levels + 1), h // 2 ** levels, w // 2 ** levels)
        q0.append(nf.distributions.GlowBase(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def free_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bench(name: str, batch: int, repeats: int) -> list[dict]:
    shape, levels, depth, hidden = CASES[name]
    torch.manual_seed(0)
    models = {"flowlib": Glow(shape, levels=levels, depth=depth, hidden=hidden),
              "normflows": normflows_glow(shape, levels, depth, hidden)}
    x = torch.rand(batch, *shape) - 0.5
    log_prob = {"flowlib": lambda m: m.log_prob(x), "normflows": lambda m: m.log_prob(x, None)}
    sample = {"flowlib": lambda m: m.sample(batch, temperature=0.7),
              "normflows": lambda m: m.sample(batch, temperature=0.7)[0]}
    for k, m in models.items():  # data-dependent ActNorm initialisation, then a finite check
        m.train()
        with torch.no_grad():
            lp = log_prob[k](m)
        if lp.shape != (batch,) or not torch.isfinite(lp).all():
            raise AssertionError(f"{k}: log_prob not finite on {name}")
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in models.items()}

    def train(k):
        def step():
            loss = -log_prob[k](models[k]).mean()
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
        return step

    def draw(k):
        def run():
            models[k].eval()
            with torch.no_grad():
                sample[k](models[k])
            models[k].train()
        return run

    rows = []
    for op, make in (("train step", train), ("sample", draw)):
        times = interleaved({k: make(k) for k in models}, repeats)
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        rows.append({"case": name, "op": op, "batch": batch, "flowlib_ms": med["flowlib"],
                     "normflows_ms": med["normflows"], "ratio": med["flowlib"] / med["normflows"],
                     "flowlib_params": free_parameters(models["flowlib"]),
                     "normflows_params": free_parameters(models["normflows"])})
        r = rows[-1]
        print(f"{name:<26} {op:<11} {r['flowlib_ms']:>9.1f} {r['normflows_ms']:>11.1f} {r['ratio']:>6.2f}"
              f"   params {r['flowlib_params'] / 1e3:.1f}K / {r['normflows_params'] / 1e3:.1f}K", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; "
          f"medians (ms), flowlib / normflows")
    print(f"{'case':<26} {'op':<11} {'flowlib':>9} {'normflows':>11} {'ratio':>6}")
    rows = [r for name in args.cases for r in bench(name, args.batch, args.repeats)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows,
                       "cpu_count": os.cpu_count()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
