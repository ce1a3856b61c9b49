"""Memory of one training step of every Table 2 / Table 5 model at the paper's batch size (issue 19).

Each model trains in a fresh process (``--one``): it builds the model, takes two AdamW steps of the negative
log-likelihood on random inputs of the set's shape, and reports its peak resident memory above the process's
memory after ``import torch`` (``resource.getrusage``'s ``ru_maxrss``): parameters, gradients, AdamW's two
moment buffers and the step's activations. Those are the tensors a GPU must hold too (plus the CUDA context
and the convolution workspace, not counted here), so the figures estimate the memory per model on a GPU.

Image models train on batches of 32 (the paper's), tabular ones on 65,536 rows. A batch that would not fit
this machine is measured at ``--image-batches`` (two smaller sizes) and extrapolated to 32 along the straight
line through them (activations grow linearly with the batch; the rest does not); the table says which.

Usage::

    python benchmarks/paper_memory.py [--image-batches 2 4] [--presets cifar10-glow-student ...]
                                      [--json results/benchmarks/paper_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

TABULAR_BATCH, IMAGE_BATCH = 65_536, 32


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_one(preset: str, dataset: str, batch: int) -> dict:
    """Peak memory (MiB) of two training steps of ``preset`` on ``dataset``-shaped data, this process."""
    import torch

    from flowlib.models import TABULAR_DIMS, count_parameters, from_preset

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("FLOWLIB_THREADS", "2")))
    before = _rss_mib()
    shape = (TABULAR_DIMS[dataset],) if dataset in TABULAR_DIMS else None
    model = from_preset(preset, shape=shape)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    x = torch.randn(batch, *shape) if shape else torch.rand(batch, *model.input_shape) - 0.5
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        (-model.log_prob(x).mean()).backward()
        opt.step()
    return {"preset": preset, "dataset": dataset, "batch": batch, "params_m": count_parameters(model) / 1e6,
            "peak_mib": _rss_mib() - before}


def _in_child(preset: str, dataset: str, batch: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", preset, dataset, str(batch)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", nargs=3, metavar=("PRESET", "DATASET", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--image-batches", nargs=2, type=int, default=[2, 4],
                        help="two image batch sizes to measure and extrapolate to 32 from (default 2 4); "
                             "give 32 32 to measure 32 directly")
    parser.add_argument("--presets", nargs="+", help="only these flowlib.models.PRESETS entries")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one[0], args.one[1], int(args.one[2]))))
        return 0
    from flowlib.paper_scale import paper_models

    rows = []
    print(f"{'model':<24} {'dataset':<10} {'params M':>9} {'batch':>7} {'peak GiB':>9}  how")
    for m in paper_models():
        if args.presets and m.preset not in args.presets:
            continue
        if m.shape:  # tabular: the paper's batch, measured
            r = _in_child(m.preset, m.dataset, TABULAR_BATCH)
            r["how"] = "measured"
        else:
            b1, b2 = args.image_batches
            r1 = _in_child(m.preset, m.dataset, b1)
            if b1 == b2:
                r = {**r1, "how": "measured"}
            else:
                r2 = _in_child(m.preset, m.dataset, b2)
                slope = (r2["peak_mib"] - r1["peak_mib"]) / (b2 - b1)
                r = {**r2, "batch": IMAGE_BATCH, "peak_mib": r2["peak_mib"] + slope * (IMAGE_BATCH - b2),
                     "how": f"extrapolated from batches {b1} and {b2} ({r1['peak_mib']:.0f} and "
                            f"{r2['peak_mib']:.0f} MiB)"}
        r["role"] = m.role
        rows.append(r)
        print(f"{r['preset']:<24} {r['dataset']:<10} {r['params_m']:>9.3f} {r['batch']:>7,} "
              f"{r['peak_mib'] / 1024:>9.2f}  {r['how']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "threads": os.environ.get("FLOWLIB_THREADS", "2")}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
