"""Tests of flowlib.train: the training loop, checkpoints, resuming, divergence guard, train_or_load."""

import copy
import hashlib
import json
import math

import pytest
import torch

from flowlib.distill import freeze
from flowlib.models import MAF, Glow
from flowlib.train import (
    TrainConfig,
    TrainingDiverged,
    config_diff,
    config_hash,
    evaluate,
    history_frame,
    is_trained,
    load_checkpoint,
    load_model,
    rehash_checkpoints,
    resolve_device,
    save_checkpoint,
    train,
    train_or_load,
)


def moons(n: int, seed: int) -> torch.Tensor:
    """Two interleaved half circles with Gaussian noise, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * math.pi
    upper = torch.randint(0, 2, (n,), generator=g).bool()[:, None]
    a = torch.stack([torch.cos(t), torch.sin(t)], 1)
    b = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
    return torch.where(upper, a, b) + 0.1 * torch.randn(n, 2, generator=g)


TRAIN, VAL = moons(1024, 0), moons(256, 1)
IMAGES = torch.randint(0, 256, (64, 1, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
IMAGES_VAL = IMAGES[:16].clone()

BASE = TrainConfig(name="toy", arch="maf", model_kwargs={"depth": 2, "hidden": 16}, dataset="moons",
                   steps=30, batch_size=64, lr=3e-3, warmup_steps=5, eval_every=10, seed=0)


class Interrupt(Exception):
    pass


def _maf(seed=0, depth=2):
    torch.manual_seed(seed)
    return MAF(2, depth=depth, hidden=16)


def _bytes(path):
    return path.read_bytes()


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------

def test_config_hash_is_stable_and_ignores_device_only():
    d = BASE.to_dict()
    del d["device"]
    for key in ("lambda_schedule", "patience", "train_fraction", "precision"):
        del d[key]  # added later: hashed only when not at their defaults (see the next test)
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"))
    assert config_hash(BASE) == hashlib.sha256(canonical.encode()).hexdigest()[:10]
    assert config_hash(BASE.replace(device="cuda")) == config_hash(BASE)
    assert config_hash(BASE.replace(lr=1e-4)) != config_hash(BASE)
    assert config_hash(TrainConfig.from_dict(BASE.to_dict())) == config_hash(BASE)
    student = BASE.replace(name="s", method="ilkd", teacher=BASE, lambdas=[0.9, 0.1, 0])
    again = TrainConfig.from_dict(json.loads(json.dumps(student.to_dict())))
    assert isinstance(again.teacher, TrainConfig) and again.lambdas == (0.9, 0.1, 0.0)
    assert config_hash(again) == config_hash(student)
    assert config_hash(student.replace(teacher=BASE.replace(seed=1))) != config_hash(student)
    changed = student.replace(lr=1.0, teacher=BASE.replace(seed=1))
    assert config_diff(student, changed) == ["lr", "teacher.seed"]
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['epochs'\]"):
        TrainConfig.from_dict({"epochs": 3})
    with pytest.raises(ValueError, match="unknown distillation method 'foo'"):
        BASE.replace(method="foo")
    assert not BASE.distilled and student.distilled


def test_a_field_added_later_keeps_older_checkpoint_names_until_it_is_used():
    # a config stored before lambda_schedule existed has no such key; it must hash and compare as before
    old = BASE.to_dict()
    del old["lambda_schedule"]
    assert config_hash(old) == config_hash(BASE) and config_diff(old, BASE) == []
    decaying = BASE.replace(lambda_schedule="decay")
    assert config_hash(decaying) != config_hash(BASE)
    assert config_diff(old, decaying) == ["lambda_schedule"]
    with pytest.raises(ValueError, match="unknown lambda_schedule 'cosine'"):
        BASE.replace(lambda_schedule="cosine")


def test_lambdas_at_decays_the_distillation_weights_linearly():
    cfg = BASE.replace(method="skd", teacher=BASE, steps=4)
    assert [cfg.lambdas_at(s) for s in (1, 4)] == [(0.85, 0.075, 0.075)] * 2
    decay = cfg.replace(lambda_schedule="decay", lambdas=(0.9, 0.2, 0.4))
    got = [w for s in (1, 2, 3, 4) for w in decay.lambdas_at(s)]
    assert got == pytest.approx([0.9, 0.2, 0.4, 0.9, 0.15, 0.3, 0.9, 0.1, 0.2, 0.9, 0.05, 0.1])


def test_training_applies_the_scheduled_weights_at_every_step():
    teacher = _maf(seed=3)
    freeze(teacher)
    cfg = BASE.replace(name="s", method="ilkd", teacher=BASE, lambdas=(0.9, 0.5, 0.0),
                       lambda_schedule="decay", steps=5, eval_every=5)
    history = train(_maf(), TRAIN, VAL, cfg, teacher=teacher, progress=False)
    for row in history:
        factor = 1 - (row["step"] - 1) / cfg.steps
        expected = 0.9 * row["terms"]["nll"] + 0.5 * factor * row["terms"]["ilkd"]
        assert row["loss"] == pytest.approx(expected, rel=1e-6)
    assert history[0]["terms"]["ilkd"] > 0


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device='cuda' was requested but CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_save_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"a": torch.ones(2)})
    good = _bytes(path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle this"):  # torch.save fails midway
        save_checkpoint(path, {"a": torch.zeros(2), "f": Unpicklable()})
    assert _bytes(path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

def test_training_lowers_validation_nll_and_keeps_best(tmp_path):
    model = _maf()
    before = evaluate(model, VAL)
    config = BASE.replace(steps=150, eval_every=25, lr=5e-3, warmup_steps=10)
    history = train(model, TRAIN, VAL, config, checkpoint_dir=tmp_path, progress=False)
    after = evaluate(model, VAL)
    assert after["nll"] < before["nll"] - 0.4, (before, after)
    assert after["bpd"] == pytest.approx(after["nll"] / (2 * math.log(2)))
    frame = history_frame(history)
    assert list(frame["step"]) == list(range(1, 151))
    assert {"loss", "nll", "bpd", "val_nll", "val_bpd", "lr", "time", "term_nll"} <= set(frame.columns)
    evals = frame.dropna(subset=["val_nll"])
    assert list(evals["step"]) == [25, 50, 75, 100, 125, 150]
    assert evals["val_nll"].iloc[-1] == pytest.approx(after["nll"], rel=1e-6)
    # warm-up: lr grows linearly to its value at warmup_steps
    assert frame["lr"].iloc[0] == pytest.approx(5e-3 / 10) and frame["lr"].iloc[9] == pytest.approx(5e-3)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["val_nll"] == pytest.approx(evals["val_nll"].min())
    assert best["step"] == int(evals.loc[evals["val_nll"].idxmin(), "step"])
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["finished"] and last["step"] == 150
    assert evaluate(load_model(tmp_path / "best.pt"), VAL)["nll"] == pytest.approx(best["val_nll"], rel=1e-6)


def test_actnorm_initialises_on_the_first_real_batch():
    torch.manual_seed(0)
    model = Glow((2,), depth=1, hidden=8)
    seen = []
    config = BASE.replace(arch="glow", steps=1, lr=1e-12, weight_decay=0.0)
    train(model, TRAIN * 3 + 1, VAL, config, progress=False, batch_hook=lambda s, x: seen.append(x.clone()))
    actnorm = model.steps[0].actnorm
    assert bool(actnorm.initialized)
    assert torch.allclose(actnorm.bias, seen[0].mean(0), atol=1e-6)
    assert torch.allclose(actnorm.log_scale.exp(), seen[0].std(0, unbiased=False), atol=1e-5)


def test_overflowing_batch_stops_at_that_step_and_keeps_checkpoints(tmp_path):
    snapshot = {}

    def hook(step, x):
        if step == 11:  # after the step-10 evaluation wrote both checkpoints
            snapshot.update({n: _bytes(tmp_path / n) for n in ("best.pt", "last.pt")})
        if step == 13:  # finite data that overflows float32 inside the first block
            x = x.clone()
            x[0, 0] = 3e38
            return x
        return None

    with pytest.raises(TrainingDiverged, match="step 13: the value inside the model is not finite") as err:
        train(_maf(), TRAIN, VAL, BASE, checkpoint_dir=tmp_path, progress=False, batch_hook=hook)
    assert err.value.step == 13 and err.value.what == "value inside the model"
    assert math.isfinite(err.value.last_loss) and f"{err.value.last_loss:.6g}" in str(err.value)
    for name, content in snapshot.items():
        assert _bytes(tmp_path / name) == content, name
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 10


def test_nan_gradient_stops_training(tmp_path):
    model = _maf()
    poison = {"on": False}
    first = next(model.parameters())
    first.register_hook(lambda g: g * float("nan") if poison["on"] else g)

    def hook(step, x):
        poison["on"] = step == 7

    with pytest.raises(TrainingDiverged, match="step 7: the gradient norm is not finite") as err:
        train(model, TRAIN, VAL, BASE.replace(eval_every=5), checkpoint_dir=tmp_path, progress=False,
              batch_hook=hook)
    assert err.value.step == 7
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 5


def _resume_case(kind):
    """(model factory, train data, val data, config, teacher) for the resume test."""
    if kind == "maf-skd":
        teacher = _maf(seed=7, depth=3)
        train(teacher, TRAIN, VAL, BASE.replace(steps=20), progress=False)
        config = BASE.replace(name="student", method="skd", model_kwargs={"depth": 1, "hidden": 16},
                              skd_samples=16)
        return (lambda: _maf(seed=3, depth=1)), TRAIN, VAL, config, freeze(teacher)
    config = BASE.replace(name="img", arch="glow", model_kwargs={"levels": 1, "depth": 2, "hidden": 8},
                          batch_size=16)

    def build():
        torch.manual_seed(3)
        return Glow((1, 4, 4), levels=1, depth=2, hidden=8)

    return build, IMAGES, IMAGES_VAL, config, None


@pytest.mark.parametrize("kind", ["maf-skd", "glow-images"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, kind):
    build, train_x, val_x, config, teacher = _resume_case(kind)
    teacher_state = copy.deepcopy(teacher.state_dict()) if teacher is not None else None
    full_model = build()
    full = train(full_model, train_x, val_x, config, teacher=teacher, checkpoint_dir=tmp_path / "a",
                 progress=False)

    def interrupt(step, x):
        if step == 25:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(build(), train_x, val_x, config, teacher=teacher, checkpoint_dir=tmp_path / "b",
              progress=False, batch_hook=interrupt)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 20
    resumed_model = build()
    resumed = train(resumed_model, train_x, val_x, config, teacher=teacher, checkpoint_dir=tmp_path / "b",
                    progress=False)
    assert [h["step"] for h in resumed] == list(range(1, 31))
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]
    assert [h["val_nll"] for h in resumed if h["step"] % 10 == 0] == [h["val_nll"] for h in full if
                                                                     h["step"] % 10 == 0]
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    if teacher is not None:  # the teacher was never updated
        assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())
    # a finished run is not trained again, and a different config is refused with the differing keys
    again = train(build(), train_x, val_x, config, teacher=teacher, checkpoint_dir=tmp_path / "b",
                  progress=False, batch_hook=interrupt)
    assert [h["loss"] for h in again] == [h["loss"] for h in full]
    with pytest.raises(ValueError, match=r"differing keys: lr \(stored 0.003, given 0.01\)"):
        train(build(), train_x, val_x, config.replace(lr=1e-2), teacher=teacher,
              checkpoint_dir=tmp_path / "b", progress=False)


IMAGE_CONFIG = BASE.replace(arch="glow", steps=2, eval_every=2, batch_size=8)


def _last_image_record(config=IMAGE_CONFIG) -> dict:
    """The last history row of a 2-step run of a tiny image Glow (seed 0) on IMAGES."""
    torch.manual_seed(0)
    return train(Glow((1, 4, 4), levels=1, depth=1, hidden=8), IMAGES, IMAGES_VAL, config, progress=False)[-1]


def test_image_training_reports_bits_per_dim_with_dequantisation():
    rec = _last_image_record()
    # glow preprocessing (x - 0.5) has log-det 0, so bits/dim = nll / (D ln 2) + log2(256)
    assert rec["bpd"] == pytest.approx(rec["nll"] / (16 * math.log(2)) + 8, rel=1e-6)
    assert rec["val_bpd"] == pytest.approx(rec["val_nll"] / (16 * math.log(2)) + 8, rel=1e-6)


def test_distilled_config_without_teacher_is_refused():
    with pytest.raises(ValueError, match="pass teacher="):
        train(_maf(), TRAIN, VAL, BASE.replace(method="ilkd"), progress=False)


# ----------------------------------------------------------------------------------------------------
# train_or_load
# ----------------------------------------------------------------------------------------------------

def _data_fn(calls):
    def data_fn(name, split):
        calls.append((name, split))
        assert name == "moons"
        return {"train": TRAIN, "val": VAL}[split]
    return data_fn


def test_train_or_load_trains_teacher_first_then_loads(tmp_path):
    teacher_cfg = BASE.replace(name="teacher", model_kwargs={"depth": 3, "hidden": 16}, steps=20)
    student_cfg = BASE.replace(name="student", method="ilkd", teacher=teacher_cfg, steps=20)
    calls = []
    model, history = train_or_load(student_cfg, data_fn=_data_fn(calls), checkpoint_root=tmp_path,
                                   progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"teacher-{config_hash(teacher_cfg)}", f"student-{config_hash(student_cfg)}"])
    assert ("moons", "train") in calls and len(history) == 20 and "ilkd" in history[-1]["terms"]
    assert not model.training

    def no_data(name, split):
        raise AssertionError("a finished run must load without data")

    loaded, loaded_history = train_or_load(student_cfg, data_fn=no_data, checkpoint_root=tmp_path,
                                           progress=False)
    assert [h["loss"] for h in loaded_history] == [h["loss"] for h in history]
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    best = load_checkpoint(tmp_path / f"student-{config_hash(student_cfg)}" / "best.pt")
    assert evaluate(loaded, VAL)["nll"] == pytest.approx(best["val_nll"], rel=1e-6)


def test_train_or_load_resumes_partial_run(tmp_path):
    config = BASE.replace(steps=20)
    directory = tmp_path / f"{config.name}-{config_hash(config)}"

    def interrupt(step, x):
        if step == 15:
            raise Interrupt

    with pytest.raises(Interrupt):
        torch.manual_seed(config.seed)
        train(MAF(2, **config.model_kwargs), TRAIN, VAL, config, checkpoint_dir=directory, progress=False,
              batch_hook=interrupt)
    assert load_checkpoint(directory / "last.pt")["step"] == 10
    _, resumed = train_or_load(config, data_fn=_data_fn([]), checkpoint_root=tmp_path, progress=False)
    _, fresh = train_or_load(config, data_fn=_data_fn([]), checkpoint_root=tmp_path / "fresh", progress=False)
    assert [h["loss"] for h in resumed] == [h["loss"] for h in fresh]


def test_train_or_load_refuses_a_checkpoint_with_another_config(tmp_path):
    config = BASE.replace(steps=10)
    directory = tmp_path / f"{config.name}-{config_hash(config)}"
    train(_maf(), TRAIN, VAL, config.replace(batch_size=32), checkpoint_dir=directory, progress=False)
    with pytest.raises(ValueError, match=r"differing keys: batch_size \(stored 32, given 64\)"):
        train_or_load(config, data_fn=_data_fn([]), checkpoint_root=tmp_path, progress=False)


_CONCURRENT_SCRIPT = r"""
import sys, torch
import flowlib.train as ft

calls = []
real_train = ft.train
def counting_train(*args, **kwargs):
    calls.append(1)
    return real_train(*args, **kwargs)
ft.train = counting_train

def data_fn(name, split):
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    return torch.randn(512 if split == "train" else 128, 3, generator=g)

config = ft.TrainConfig(name="lock-test", arch="maf", model_kwargs={"depth": 2, "hidden": 8},
                        dataset="toy", steps=300, batch_size=64, eval_every=100, warmup_steps=0)
model, history = ft.train_or_load(config, data_fn, checkpoint_root=sys.argv[1], progress=False)
print("TRAINED", len(calls), "SUM", float(sum(p.double().sum() for p in model.parameters())))
"""


def test_concurrent_train_or_load_trains_a_config_once(tmp_path):
    """Two processes asking for the same configuration at once: one trains, the other waits on the lock and
    loads the finished checkpoint (``python -m flowlib.run --jobs 2`` relies on it)."""
    import subprocess
    import sys

    script = tmp_path / "lock_worker.py"  # (not concurrent.py: that would shadow the standard library)
    script.write_text(_CONCURRENT_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "ck")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    lines = [next(line for line in out.splitlines() if line.startswith("TRAINED")) for out, _ in outputs]
    trained = sorted(int(line.split()[1]) for line in lines)
    assert trained == [0, 1]  # exactly one of the two processes ran the training loop
    sums = {line.split()[3] for line in lines}
    assert len(sums) == 1  # and both hold the same weights


def test_training_lock_blocks_a_second_holder(tmp_path):
    import subprocess
    import sys
    import time

    from flowlib.train import training_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, pathlib\n"
        "from flowlib.train import training_lock\n"
        "with training_lock(pathlib.Path(sys.argv[1])):\n"
        "    print('held', flush=True); time.sleep(3.0)\n"), str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.perf_counter()
    with training_lock(tmp_path / "run"):
        waited = time.perf_counter() - start
    holder.wait(timeout=60)
    assert waited > 0.5


# ----------------------------------------------------------------------------------------------------
# Convergence: patience, best-validation weights, training fractions (issue 16)
# ----------------------------------------------------------------------------------------------------

def test_training_stops_after_patience_evaluations_without_improvement_and_keeps_the_best_weights(
        tmp_path, monkeypatch):
    import flowlib.train as train_module

    scripted = iter([5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 2.0, 1.0])  # best at the 3rd evaluation, then 3 worse
    real_evaluate = train_module.evaluate

    def fake_evaluate(model, data, *args, **kwargs):
        real = real_evaluate(model, data, *args, **kwargs)
        value = next(scripted)
        return {"nll": value, "bpd": value + 0 * real["bpd"]}

    monkeypatch.setattr(train_module, "evaluate", fake_evaluate)
    model = _maf()
    config = BASE.replace(steps=80, eval_every=10, patience=3)
    history = train(model, TRAIN, VAL, config, checkpoint_dir=tmp_path, progress=False)
    assert [h["step"] for h in history] == list(range(1, 61))  # stopped at the 6th evaluation, not at 80
    assert history[-1]["stopped"] == "patience"
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best["step"] == 30 and last["step"] == 60 and last["finished"]
    # the model train() hands back holds the best-validation weights, not the last ones
    for key, value in model.state_dict().items():
        assert torch.equal(value, best["model"][key]), key
    assert any(not torch.equal(last["model"][k], best["model"][k]) for k in best["model"])
    from flowlib.train import convergence
    assert convergence(history) == {"best_step": 30, "last_step": 60, "stopped_by": "patience",
                                    "plateaued": True, "best_val_nll": 3.0}
    # a finished run asked again returns the best weights too
    again = _maf(seed=7)
    train(again, TRAIN, VAL, config, checkpoint_dir=tmp_path, progress=False)
    assert all(torch.equal(v, best["model"][k]) for k, v in again.state_dict().items())


def test_without_patience_training_runs_every_step_and_reports_no_plateau_when_still_improving(monkeypatch):
    import flowlib.train as train_module
    from flowlib.train import convergence, evaluations_without_improvement

    values = iter([5.0, 4.0, 3.0])
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: {"nll": next(values), "bpd": 0.0})
    history = train(_maf(), TRAIN, VAL, BASE, progress=False)
    assert len(history) == 30
    assert convergence(history)["plateaued"] is False and convergence(history)["stopped_by"] == "steps"
    assert evaluations_without_improvement(history) == 0
    with pytest.raises(ValueError, match="patience"):
        BASE.replace(patience=0)


def test_with_early_stopping_the_step_count_is_a_cap_outside_the_hash():
    early = BASE.replace(patience=3)
    assert config_hash(early.replace(steps=999)) == config_hash(early)
    assert config_diff(early, early.replace(steps=999)) == []
    # without patience, or with weights that decay over `steps`, the step count changes what is computed
    assert config_hash(BASE.replace(steps=999)) != config_hash(BASE)
    decaying = early.replace(lambda_schedule="decay")
    assert config_hash(decaying.replace(steps=999)) != config_hash(decaying)
    # but a teacher's cap stays in its students' identity: raising it may change the teacher's weights
    student = BASE.replace(name="s", method="ilkd", teacher=early, patience=3)
    assert config_hash(student.replace(steps=999)) == config_hash(student)
    assert config_hash(student.replace(teacher=early.replace(steps=5))) != config_hash(student)
    assert config_diff(student, student.replace(teacher=early.replace(steps=5))) == ["teacher.steps"]


def test_raising_the_cap_extends_a_capped_run_exactly_and_leaves_a_plateaued_one(tmp_path):
    capped = BASE.replace(steps=20, patience=100)  # patience never reached: the run stops at its cap
    _, first = train_or_load(capped, data_fn=_data_fn([]), checkpoint_root=tmp_path, progress=False)
    assert len(first) == 20 and "stopped" not in first[-1]
    raised = capped.replace(steps=40)
    assert not is_trained(raised, tmp_path) and is_trained(capped, tmp_path)
    extended_model, extended = train_or_load(raised, data_fn=_data_fn([]), checkpoint_root=tmp_path,
                                             progress=False)
    fresh_model, fresh = train_or_load(raised, data_fn=_data_fn([]), checkpoint_root=tmp_path / "fresh",
                                       progress=False)
    assert len(extended) == 40 and [h["loss"] for h in extended] == [h["loss"] for h in fresh]
    assert all(torch.equal(a, b) for a, b in zip(extended_model.state_dict().values(),
                                                  fresh_model.state_dict().values()))
    assert [p.name for p in tmp_path.iterdir() if p.name != "fresh"] == [f"toy-{config_hash(capped)}"]
    # a cap below where the stored run went is another run: refused, naming steps
    with pytest.raises(ValueError, match="trained to step 40, beyond this config's cap steps=30"):
        train_or_load(capped.replace(steps=30), data_fn=_data_fn([]), checkpoint_root=tmp_path,
                      progress=False)


def test_a_run_stopped_on_its_plateau_loads_unchanged_under_a_higher_cap(tmp_path, monkeypatch):
    import flowlib.train as train_module

    scripted = iter([3.0, 3.5, 3.6])  # best at the first evaluation, then two worse: stop at step 30
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: {"nll": next(scripted), "bpd": 0.0})
    config = BASE.replace(steps=50, patience=2)
    _, history = train_or_load(config, data_fn=_data_fn([]), checkpoint_root=tmp_path, progress=False)
    assert history[-1]["step"] == 30 and history[-1]["stopped"] == "patience"

    def no_data(name, split):
        raise AssertionError("a plateaued run must load, not train again")

    _, again = train_or_load(config.replace(steps=500), data_fn=no_data, checkpoint_root=tmp_path,
                             progress=False)
    assert [h["loss"] for h in again] == [h["loss"] for h in history]


def test_rehash_checkpoints_renames_a_directory_named_by_an_older_hash(tmp_path):
    config = BASE.replace(steps=20, patience=5)
    train_or_load(config, data_fn=_data_fn([]), checkpoint_root=tmp_path, progress=False)
    (current,) = tmp_path.iterdir()
    old = current.rename(tmp_path / "toy-0123456789")  # as an earlier flowlib named it
    (tmp_path / "stray").mkdir()  # not a run: left alone
    assert rehash_checkpoints(tmp_path) == [("toy-0123456789", current.name)]
    assert not old.exists() and is_trained(config, tmp_path) and (tmp_path / "stray").is_dir()
    assert rehash_checkpoints(tmp_path) == []


def test_training_subset_is_one_fixed_nested_permutation():
    from flowlib.train import training_subset

    x = torch.arange(1000.0)[:, None]
    small, large = training_subset(x, 0.1), training_subset(x, 0.3)
    assert len(small) == 100 and len(large) == 300
    assert set(small.flatten().tolist()) <= set(large.flatten().tolist())  # nested
    assert torch.equal(training_subset(x, 0.1), small)  # the same rows every time, whatever the seed
    assert len(set(small.flatten().tolist())) == 100 and small.flatten().tolist() != list(range(100))
    assert training_subset(x, 1.0) is x
    with pytest.raises(ValueError, match="train_fraction"):
        BASE.replace(train_fraction=0.0)
    # train() uses it: a run on 10% of the rows only ever draws those rows
    seen = []
    train(_maf(), TRAIN, VAL, BASE.replace(steps=20, train_fraction=0.1), progress=False,
          batch_hook=lambda step, xb: seen.append(xb.clone()))
    rows = torch.cat(seen)
    allowed = training_subset(TRAIN, 0.1)
    assert all(bool((allowed == r).all(1).any()) for r in rows[:200])


def test_image_distillation_objective_is_in_bits_per_dim():
    rec = _last_image_record()
    assert rec["terms"]["nll"] == pytest.approx(rec["bpd"], rel=1e-6)  # the loss's NLL term is bits/dim
    assert rec["loss"] == pytest.approx(rec["bpd"], rel=1e-6)
    nats = _last_image_record(IMAGE_CONFIG.replace(nll_unit="nats"))
    assert nats["terms"]["nll"] == pytest.approx(nats["nll"], rel=1e-6)  # the old unit, on request
