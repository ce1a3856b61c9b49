"""The notebooks at the paper's scale (issue 19): ``scale`` "paper" / "official" gives the paper's sets,
Table 2/5 models and budgets (flowlib.paper_scale.paper_config), and ``python -m flowlib.run -f
configs/paper.yaml`` runs notebooks 04-08 and 11 with them, into their own folders, after checking that every
set is on disk.

The end-to-end run uses tiny files in the real formats (POWER's data.npy, CIFAR-10's pickled batches) and
``--fast`` (the paper's models, a few steps each), so nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flowlib import data_sources, run
from flowlib.experiments import evaluate_runs, student_config, teacher_config
from flowlib.models import PRESETS, build_model, count_parameters, from_preset
from flowlib.paper_scale import BUDGETS, FAST_STEPS, paper_config
from flowlib.train import config_hash

from .test_data import write_cifar_batches, write_power

PAPER_YAML = str(run.project_path("configs/paper.yaml"))


def _sizes(preset: str) -> dict:
    return {k: v for k, v in PRESETS[preset].items() if k not in ("arch", "shape")}


def test_paper_scale_configs_are_the_presets_with_the_papers_budget():
    teacher = teacher_config("glow", "power", scale="paper")
    assert teacher.model_kwargs == _sizes("tabular-glow-teacher")
    budget = (teacher.steps, teacher.batch_size, teacher.lr, teacher.weight_decay)
    assert budget == (10_000, 65_536, 5e-5, 0.01)
    assert teacher.patience is None and teacher.eval_every == 500  # a fixed budget; best weights kept
    # the built model is the preset's, parameter for parameter
    built = build_model("glow", (6,), **teacher.model_kwargs)
    assert count_parameters(built) == count_parameters(from_preset("tabular-glow-teacher", shape=(6,)))

    student = student_config("maf", "gas", "ilkd", scale="paper", seed=3)
    assert student.model_kwargs == _sizes("tabular-maf-student") and student.seed == 3
    assert student.teacher == teacher_config("maf", "gas", scale="paper")
    assert student_config("glow", "power", "nll", scale="paper").teacher is None

    image = student_config("glow", "cifar10", "skd", scale="paper")
    assert image.model_kwargs == _sizes("cifar10-glow-student") and image.batch_size == 32
    assert image.skd_samples is None  # as many decoded samples as the batch (the official code)


def test_the_official_budget_is_adam_for_the_official_number_of_epochs():
    official = teacher_config("maf", "power", scale="official")
    b = BUDGETS["official"]["tabular"]
    assert (official.steps, official.lr, official.weight_decay) == (10_000 * 26, b.lr, 0.0)
    assert official.name.startswith("official-") and config_hash(official) != config_hash(
        teacher_config("maf", "power", scale="paper"))


def test_fast_mode_keeps_the_papers_models_and_shortens_the_run():
    fast = teacher_config("glow", "cifar10", scale="paper", fast=True)
    assert fast.model_kwargs == _sizes("cifar10-glow-teacher") and fast.steps == FAST_STEPS
    assert fast.name.endswith("-fast") and config_hash(fast) != config_hash(
        teacher_config("glow", "cifar10", scale="paper"))


def test_paper_scale_refuses_sets_and_scales_it_does_not_have():
    with pytest.raises(ValueError, match="'magic' is not one of the paper's sets"):
        teacher_config("glow", "magic", scale="paper")
    with pytest.raises(ValueError, match="unknown scale 'gpu'; choose one of cpu, paper, official"):
        student_config("glow", "power", scale="gpu")
    with pytest.raises(ValueError, match="image models are GLOWs"):
        paper_config("maf", "cifar10")
    with pytest.raises(ValueError, match="unknown budget"):
        paper_config("glow", "power", budget="cpu")


def test_cpu_scale_is_unchanged_by_the_scale_parameter():
    assert teacher_config("maf", "magic") == teacher_config("maf", "magic", scale="cpu")
    assert config_hash(student_config("glow", "fashion-mnist-16", "ilkd")) == config_hash(
        student_config("glow", "fashion-mnist-16", "ilkd", scale="cpu"))


def test_evaluate_runs_trains_the_papers_models_on_a_paper_set(tmp_path, monkeypatch):
    write_power(data_sources.maf_dir(tmp_path / "data"))
    monkeypatch.setenv("FLOWLIB_DATA", str(tmp_path / "data"))
    rows = evaluate_runs("maf", "power", ["nll", "lkd"], [0], fast=True, scale="paper",
                         checkpoint_root=tmp_path / "ck", progress=False)
    assert [r["model"] for r in rows] == ["teacher", "nll", "lkd"]
    expected = {"teacher": "tabular-maf-teacher", "nll": "tabular-maf-student", "lkd": "tabular-maf-student"}
    for r in rows:
        preset = from_preset(expected[r["model"]], shape=(6,))
        assert r["params_k"] == pytest.approx(count_parameters(preset) / 1e3, abs=0.05)
        assert r["last_step"] == FAST_STEPS and np.isfinite(r["test_ll"])
    names = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "ck").iterdir())
    assert names == ["paper-power-maf-student-lkd-fast", "paper-power-maf-student-nll-fast",
                     "paper-power-maf-teacher-fast"]


# --------------------------------------------------------------------------------------------------
# python -m flowlib.run -f configs/paper.yaml
# --------------------------------------------------------------------------------------------------

def test_a_paper_scale_run_without_its_data_stops_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLOWLIB_DATA", str(tmp_path))  # an empty data folder
    assert run.main(["-f", PAPER_YAML, "--output-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "power is not on disk" in err and "download=True" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_paper_scale_run_refuses_the_cpu_folders_and_sets(tmp_path, monkeypatch, capsys):
    assert run.main(["-f", PAPER_YAML, "-p", "results_dir", "results"]) == 1
    assert "results_dir 'results' holds the CPU-scale results" in capsys.readouterr().err
    cpu_yaml = str(run.project_path("configs/cpu.yaml"))
    assert run.main(["-f", cpu_yaml, "-p", "scale", "paper", "--only", "05", "-p", "results_dir",
                     str(tmp_path / "r"), "-p", "checkpoint_dir", str(tmp_path / "c")]) == 1
    assert "'magic' is not one of the paper's sets" in capsys.readouterr().err
    assert run.main(["-f", PAPER_YAML, "--only", "09"]) == 1
    assert "none of 09_self_normalizing_flows runs at the paper's scale" in capsys.readouterr().err


SITECUSTOMIZE = '''
import json, os
from torchvision.datasets import CIFAR10
_sums = json.loads(os.environ["FLOWLIB_TEST_CIFAR_MD5"])
CIFAR10.train_list, CIFAR10.test_list = _sums["train"], _sums["test"]
CIFAR10.meta = {**CIFAR10.meta, "md5": _sums["meta"]}
'''


def test_configs_paper_yaml_runs_notebooks_04_to_08_and_11_on_the_papers_models(tmp_path):
    """The whole paper-scale chain on POWER and CIFAR-10 (tiny files in their formats), --fast: the paper's
    Table 2/5 models, FAST_STEPS steps each, results and checkpoints in the run's own folders."""
    write_power(data_sources.maf_dir(tmp_path / "data"))
    sums = write_cifar_batches(tmp_path / "data", n_train=20, n_test=40)[2]  # 08 interpolates 16 pairs
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "FLOWLIB_DATA": str(tmp_path / "data"), "FLOWLIB_TEST_CIFAR_MD5": json.dumps(sums),
           "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("FLOWLIB_FAST", None)
    cmd = [sys.executable, "-m", "flowlib.run", "-f", PAPER_YAML, "--fast", "--threads", "2",
           "-p", "tabular_datasets", "[power]", "-p", "device", "cpu",
           "-p", "results_dir", str(tmp_path / "results"), "-p", "checkpoint_dir", str(tmp_path / "ck"),
           "--output-dir", str(tmp_path / "runs")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "not run: 01_change_of_variables" in done.stdout
    executed = sorted(p.stem for p in (tmp_path / "runs").glob("*.ipynb"))
    assert executed == ["04_teacher_training", "05_lkd", "06_ilkd", "07_skd_and_combined", "08_evaluation",
                        "11_results"]
    results = tmp_path / "results" / "fast"  # --fast never writes where a real paper-scale run writes
    evaluation = json.loads((results / "08_evaluation.json").read_text())["results"]
    teachers = {r["arch"]: r for r in evaluation["table1_rows"] if r["model"] == "teacher"}
    for arch in ("glow", "maf"):
        expected = count_parameters(from_preset(f"tabular-{arch}-teacher", shape=(6,))) / 1e3
        assert teachers[arch]["dataset"] == "power"
        assert teachers[arch]["params_k"] == pytest.approx(expected, abs=0.05)
        assert teachers[arch]["last_step"] == FAST_STEPS
    teacher_results = json.loads((results / "04_teacher_training.json").read_text())["results"]
    image_teacher = teacher_results["image"]["cifar10/glow"]
    expected = count_parameters(from_preset("cifar10-glow-teacher")) / 1e3
    assert image_teacher["params_k"] == pytest.approx(expected, abs=0.05)
    folders = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "ck" / "fast").iterdir()}
    assert {"paper-power-glow-teacher-fast", "paper-cifar10-glow-teacher-fast",
            "paper-cifar10-glow-student-ilkd-fast"} <= folders
    manifest = json.loads((results / "run.json").read_text())
    assert "configs/paper.yaml" in manifest["last_invocation"]["command"]
