"""flowlib.experiments: which data a model is scored on, ablation variants, the gap-closure summary."""

import pytest
import torch

from flowlib import data
from flowlib.experiments import Variant, _test_metric, student_config, summarise, variant_config
from flowlib.models import MAF
from flowlib.train import config_hash


def test_every_seed_is_scored_on_the_test_split_the_models_were_trained_against():
    # training always loads the default split (train.train_or_load's data_fn); seeds 1 and 2 must not be
    # scored on a re-drawn split, whose "test" rows would include rows of that training set
    train = data.load("magic", "train")
    torch.manual_seed(0)
    model = MAF(train.shape[1], depth=1, hidden=8)
    scores = [_test_metric(model, "magic", seed) for seed in (0, 1, 2)]
    assert scores[0]["test_ll"] == scores[1]["test_ll"] == scores[2]["test_ll"]
    test = data.load("magic", "test")
    assert scores[0]["n_test"] == len(test)
    train_rows = {tuple(r) for r in train.tolist()}
    assert not any(tuple(r) in train_rows for r in test.tolist())


def test_variant_config_changes_only_what_it_names():
    base = student_config("maf", "magic", "ilkd", seed=1)
    v = variant_config("maf", "magic", Variant("ilkd", lambdas=(1.0, 0.3, 0.0), steps_factor=2.0,
                                               lr_factor=0.5), seed=1)
    assert v.steps == 2 * base.steps and v.lr == pytest.approx(0.5 * base.lr)
    assert v.lambdas == (1.0, 0.3, 0.0) and v.teacher == base.teacher and v.seed == 1
    assert config_hash(v) != config_hash(base)
    assert config_hash(variant_config("maf", "magic", Variant("ilkd"), seed=1)) == config_hash(base)


def test_summarise_gap_closure_is_computed_from_the_means():
    rows = [{"arch": "maf", "dataset": "d", "model": "teacher", "seed": 0, "test_ll": 1.0}]
    for model, values in (("nll", (-1.0, -3.0)), ("ilkd", (0.0, -2.0))):
        rows += [{"arch": "maf", "dataset": "d", "model": model, "seed": s, "test_ll": v}
                 for s, v in enumerate(values)]
    table = summarise(rows).set_index("model")
    assert table.loc["nll", "mean"] == -2.0 and table.loc["ilkd", "mean"] == -1.0
    assert table.loc["ilkd", "gap_closure"] == pytest.approx((-1.0 - -2.0) / (1.0 - -2.0))
    assert table.loc["ilkd", "std"] == pytest.approx(2 ** 0.5) and table.loc["ilkd", "count"] == 2


def test_train_image_models_trains_the_teacher_beside_plain_students_then_loads_them(tmp_path):
    from flowlib.experiments import train_image_models

    records = train_image_models(seeds=(0,), fast=True, workers=2, checkpoint_root=tmp_path)
    assert [(r["method"], r["seed"]) for r in records] == [("nll", 0), ("nll", 0), ("ilkd", 0)]
    assert "teacher" in records[0]["name"] and "student-nll" in records[1]["name"]
    assert all(r["last_step"] == 12 and r["train_seconds"] > 0 for r in records)
    # a second call (one process) loads the same checkpoints: the recorded training is the first call's
    again = train_image_models(seeds=(0,), fast=True, workers=1, checkpoint_root=tmp_path)
    assert [(r["name"], r["train_seconds"], r["best_val_nll"]) for r in again] == [
        (r["name"], r["train_seconds"], r["best_val_nll"]) for r in records]
    with pytest.raises(ValueError, match="not an image set"):
        train_image_models("magic", fast=True, checkpoint_root=tmp_path)
