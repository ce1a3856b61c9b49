"""The numbers printed in *Distilling Normalizing Flows* (Walton et al.), for side-by-side tables.

Transcribed from the paper's Tables 1, 2, 4 and 6 (the parameter counts of Table 2 and 5 live in
:data:`flowlib.models.PAPER_PARAMS_K`). ``None`` marks a cell the paper leaves empty ("-"). The GLOW
teacher's POWER entry is printed as "0.143" after a column dash in the text version we transcribed from;
we read it as +0.143 (the teacher is the best GLOW row on every other set too).
"""

from __future__ import annotations

DATASETS = ("power", "gas", "hepmass", "miniboone", "bsds300")

# Table 1: average test log-likelihood in nats (higher is better).
TABLE1 = {
    "glow": {
        "Student": (-0.228, 5.967, -22.668, -17.251, 147.298),
        "LKD Student": (-0.132, 6.008, -22.332, -17.136, 162.103),
        "ILKD Student": (-0.133, 6.191, -22.187, -17.008, 163.148),
        "SKD Student": (-0.078, 6.515, -21.852, -16.130, 163.953),
        "Teacher": (0.143, 6.604, -19.938, -13.597, 165.702),
    },
    "maf": {
        "Student": (-0.152, 4.385, -21.904, -15.314, 155.463),
        "LKD Student": (-0.149, 4.473, -21.389, -15.217, 155.629),
        "ILKD Student": (-0.145, 4.502, -21.223, -15.184, 155.785),
        "SKD Student": (None, None, None, None, None),
        "Teacher": (0.133, 5.887, -20.662, -13.488, 159.442),
    },
}

# Table 2: time of one batch in ms (mean, std).
TABLE2_TIME_MS = {
    "glow": {
        "Student": ((2.32, 0.16), (2.46, 0.1), (2.55, 0.35), (2.47, 0.07), (2.45, 0.07)),
        "Teacher": ((3.65, 0.26), (3.88, 0.09), (4.41, 0.28), (3.95, 0.11), (3.89, 0.14)),
    },
    "maf": {
        "Student": ((2.0, 0.21), (1.98, 0.19), (1.82, 0.05), (1.82, 0.05), (1.91, 0.22)),
        "Teacher": ((3.34, 0.22), (3.22, 0.18), (3.34, 0.23), (3.36, 0.26), (3.45, 0.2)),
    },
}

# Table 4: image generation with ILKD, bits/dim and FID (lower is better).
TABLE4 = {
    "cifar10": {"Student": (3.498, 71.177), "ILKD Student": (3.481, 69.371), "Teacher": (3.423, 68.503)},
    "celeba": {"Student": (2.479, 68.127), "ILKD Student": (2.475, 54.480), "Teacher": (2.474, 37.460)},
}

# Table 6: CelebA FID of images decoded from norm-preserving latent interpolations (Eq. 16).
TABLE6 = {"Student": (40.159, 28.432), "ILKD Student": (28.413, 19.688), "Teacher": (19.062, 16.382)}
TABLE6_TEMPERATURES = (1.0, 0.7)


def table1_records() -> list[dict]:
    """Table 1 as records ``{arch, model, dataset, value}`` (empty cells left out)."""
    out = []
    for arch, rows in TABLE1.items():
        for model, values in rows.items():
            for ds, v in zip(DATASETS, values):
                if v is not None:
                    out.append({"arch": arch, "model": model, "dataset": ds, "value": v})
    return out


def gap_closure(arch: str, model: str, dataset: str) -> float | None:
    """``(distilled - student) / (teacher - student)`` of a Table 1 row (None where a cell is empty)."""
    i = DATASETS.index(dataset)
    rows = TABLE1[arch]
    d, s, t = rows[model][i], rows["Student"][i], rows["Teacher"][i]
    if d is None or s is None or t is None or t == s:
        return None
    return (d - s) / (t - s)
