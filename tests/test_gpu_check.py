"""scripts/gpu_check.sh and flowlib.gpu_check (issue 19), checked on the CPU with small batches: it times
every selected paper model, compares bf16 with float32, and refuses a machine without CUDA by default."""

from __future__ import annotations

import subprocess

import pytest
import torch

from flowlib import gpu_check
from flowlib.results import project_path


def test_the_check_times_each_model_and_compares_bf16(capsys):
    code = gpu_check.main(["--device", "cpu", "--steps", "2", "--seconds", "5", "--max-batch", "4",
                           "--models", "miniboone", "celeba-glow-student"])
    out = capsys.readouterr().out
    assert code == 0, out
    timed = [line for line in out.splitlines() if " steps/s " in line]
    assert len(timed) == 5  # GLOW and MAF teacher and student on MINIBOONE, the CelebA student
    assert all(" 2 steps " in line for line in timed)
    assert "celeba-glow-student      batch   4  max |log p bf16 - fp32|" in out
    assert "summary: all finite, bf16 within 5e-3 nats/dim" in out


def test_bf16_check_measures_a_real_difference():
    (m,) = [m for m in gpu_check.paper_models([], ["cifar10"]) if m.role == "student"]
    c = gpu_check.bf16_check(m, torch.device("cpu"), batch=2, repeats=1)
    assert 0 < c["max_diff_nats_per_dim"] < 5e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the real check instead")
def test_without_cuda_it_says_so(capsys):
    assert gpu_check.main([]) == 1
    assert "no CUDA device here" in capsys.readouterr().err


def test_the_script_is_valid_bash():
    script = project_path("scripts/gpu_check.sh")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "flowlib.gpu_check" in script.read_text()
