"""Faults around training (issue 15, items 11, 14, 15, 16): non-finite validation or weights stop a run before
anything is saved, bad configs are refused field by field, corrupt checkpoints are named, and a run killed
mid-write leaves nothing behind on its next start."""

import math
import zipfile

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from flowlib.models import MAF
from flowlib.train import (
    CheckpointError,
    TrainConfig,
    TrainingDiverged,
    load_checkpoint,
    load_model,
    save_checkpoint,
    train,
    train_or_load,
)

G = torch.Generator().manual_seed(0)
TRAIN, VAL = torch.randn(512, 2, generator=G), torch.randn(128, 2, generator=G)
BASE = TrainConfig(name="toy", arch="maf", model_kwargs={"depth": 2, "hidden": 8}, dataset="toy",
                   steps=20, batch_size=64, lr=3e-3, warmup_steps=2, eval_every=5, seed=0)


def _maf():
    torch.manual_seed(0)
    return MAF(2, depth=2, hidden=8)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- item 11: the divergence guard covers validation and the weights ---------------------------------------

class _ValidationThatBreaks:
    """Validation batches: the real ones at the first ``good`` evaluations, then a row whose density
    underflows to 0 (finite data, log-likelihood -inf) -- a model that has left the finite world."""

    def __init__(self, good: int):
        self.calls, self.good = 0, good

    def __iter__(self):
        self.calls += 1
        if self.calls > self.good:
            bad = VAL.clone()
            bad[0] = 3e38
            yield bad
        else:
            yield VAL


def test_non_finite_validation_nll_stops_before_anything_is_saved(tmp_path):
    with pytest.raises(TrainingDiverged, match="step 10: the validation NLL is not finite") as err:
        train(_maf(), TRAIN, _ValidationThatBreaks(good=1), BASE, checkpoint_dir=tmp_path, progress=False)
    assert err.value.step == 10 and err.value.what == "validation NLL"
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["step"] == 5 and math.isfinite(ck["best_val"])  # the step-5 state, not the diverged one
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 5


def test_non_finite_weights_after_a_step_stop_before_saving(tmp_path):
    model = _maf()
    first = next(model.parameters())

    def poison(optimizer, args, kwargs):
        if optimizer.state[first]["step"] == 5:  # the optimizer step of training step 5
            with torch.no_grad():
                first[0] = float("inf")

    hook = register_optimizer_step_post_hook(poison)
    try:
        with pytest.raises(TrainingDiverged, match="step 5: the model's weights after the update"):
            train(model, TRAIN, VAL, BASE, checkpoint_dir=tmp_path, progress=False)
    finally:
        hook.remove()
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()


@pytest.mark.parametrize("which", ["train", "val"])
def test_nan_in_the_data_is_a_data_error_before_training(tmp_path, which):
    bad = (TRAIN if which == "train" else VAL).clone()
    bad[7, 1] = float("nan")
    model = _maf()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = (bad, VAL) if which == "train" else (TRAIN, bad)
    with pytest.raises(ValueError, match=rf"{which}_data contains NaN or inf in 1 row\(s\) \(first: row 7\)"):
        train(model, *args, BASE, checkpoint_dir=tmp_path / "ck", progress=False)
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- item 14: every TrainConfig field is validated ---------------------------------------------------------

@pytest.mark.parametrize("field,value,needle", [
    ("grad_clip", -1.0, "grad_clip must be a finite number > 0"),
    ("grad_clip", 0, "grad_clip must be a finite number > 0"),
    ("grad_clip", math.nan, "grad_clip"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("lr", -1e-3, "lr must be"),
    ("lr", math.inf, "lr must be"),
    ("lr", "1e-3", "lr must be"),
    ("steps", 0, "steps must be an integer >= 1"),
    ("steps", -5, "steps must be"),
    ("steps", 2.5, "steps must be"),
    ("steps", True, "steps must be"),
    ("batch_size", 0, "batch_size must be"),
    ("eval_every", 0, "eval_every must be"),
    ("warmup_steps", -1, "warmup_steps must be"),
    ("weight_decay", -0.1, "weight_decay must be"),
    ("temperature", math.nan, "temperature must be"),
    ("temperature", -0.5, "temperature must be"),
    ("skd_samples", 0, "skd_samples must be"),
    ("bins", 1, "bins must be"),
    ("arch", "realnvp", "arch must be one of glow, maf"),
    ("name", "../../x", "name must be a plain folder name"),
    ("name", "a/b", "name must be a plain folder name"),
    ("name", "", "name must be a plain folder name"),
    ("lambdas", (1.0, math.nan, 0.0), "lambdas must be three finite weights"),
    ("seed", 1.5, "seed must be an integer"),
])
def test_train_config_rejects_each_bad_field(field, value, needle):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{needle}"):
        BASE.replace(**{field: value})


def test_a_name_with_path_separators_never_writes_outside_the_root(tmp_path):
    root = tmp_path / "a" / "b" / "root"
    with pytest.raises(ValueError, match="name"):
        train_or_load(BASE.replace(name="../../x"), lambda n, s: TRAIN if s == "train" else VAL, root,
                      progress=False)
    assert not any(tmp_path.rglob("x-*"))


# --- item 15: corrupt checkpoints are named, and a checksum catches flipped bytes ---------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    model, _ = train_or_load(BASE, lambda n, s: TRAIN if s == "train" else VAL, root, progress=False)
    return next(root.iterdir()), model


@pytest.mark.parametrize("damage", ["empty", "half", "garbage"])
def test_truncated_or_foreign_checkpoint_is_named(trained, tmp_path, damage):
    folder, _ = trained
    data = (folder / "last.pt").read_bytes()
    broken = tmp_path / "last.pt"
    broken.write_bytes({"empty": b"", "half": data[: len(data) // 2], "garbage": b"\x00" * 300}[damage])
    with pytest.raises(CheckpointError, match=r"last\.pt is unreadable .*delete .*last\.pt to retrain"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="last.pt"):
        load_model(broken)


def test_a_flipped_byte_inside_a_checkpoints_weights_fails_its_checksum(trained, tmp_path):
    folder, _ = trained
    data = bytearray((folder / "best.pt").read_bytes())
    weights = load_checkpoint(folder / "best.pt")["model"]
    name, tensor = max(weights.items(), key=lambda kv: kv[1].numel())
    at = bytes(data).find(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    assert at > 0, "torch.save stores tensor bytes uncompressed"
    data[at + 5] ^= 0x10
    broken = tmp_path / "best.pt"
    broken.write_bytes(bytes(data))
    with zipfile.ZipFile(broken) as z:  # the archive itself is still well-formed: only the content changed
        assert z.namelist()
    with pytest.raises(CheckpointError, match=r"best\.pt fails its checksum"):
        load_checkpoint(broken)


def test_checkpoints_stay_plain_torch_archives(trained):
    folder, model = trained
    ck = torch.load(folder / "best.pt", weights_only=True)
    assert isinstance(ck["checksum"], str) and len(ck["checksum"]) == 64
    assert all(torch.equal(ck["model"][k], v) for k, v in model.state_dict().items())


def test_train_or_load_on_a_truncated_last_pt_names_it(tmp_path):
    data_fn = lambda n, s: TRAIN if s == "train" else VAL  # noqa: E731
    train_or_load(BASE, data_fn, tmp_path, progress=False)
    last = next(tmp_path.iterdir()) / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=str(last).replace(".", r"\.")):
        train_or_load(BASE, data_fn, tmp_path, progress=False)


def test_save_checkpoint_replaces_a_stale_checksum(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"version": 1, "x": torch.arange(3), "checksum": "stale"})
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["x"], torch.arange(3))


# --- item 16: a kill mid-write leaves temporary files; the next start removes them ------------------------

def test_stale_temporary_files_are_removed_on_the_next_start(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale = [tmp_path / ".last.pt.k3j2x9.tmp", tmp_path / ".best.pt.a1b2c3.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    train(_maf(), TRAIN, VAL, BASE.replace(steps=5), checkpoint_dir=tmp_path, progress=False)
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_a_nan_batch_from_the_hook_is_refused_before_any_update(tmp_path):
    model = _maf()
    snapshot = {}

    def hook(step, x):
        if step == 7:
            snapshot.update({k: v.clone() for k, v in model.state_dict().items()})
            x = x.clone()
            x[3, 0] = float("nan")
            return x
        return None

    with pytest.raises(ValueError, match="training batch of step 7 .* contains NaN or inf"):
        train(model, TRAIN, VAL, BASE, checkpoint_dir=tmp_path, progress=False, batch_hook=hook)
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 5
