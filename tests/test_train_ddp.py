"""Data-parallel training (flowlib.train_ddp, issue 19): two gloo processes on the CPU take the steps of one
process with the whole batch, only rank 0 writes, and a run killed under torchrun resumes to the same
weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowlib.checkpoints import load_checkpoint
from flowlib.models import Glow
from flowlib.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _tabular() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 0.3, 0.0], [0.0, 0.0, 1.0, -0.4], [0.2, 0.0, 0.0, 1.0]],
        dtype=torch.float64)
    return x[:64], x[64:]


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (48, 1, 8, 8), generator=g, dtype=torch.uint8)
    return x[:32], x[32:]


def _cases() -> dict:
    """name -> (student, teacher or None, train, val, config): float64, so that the only difference between
    one and two processes is the rounding of the gradient average."""
    torch.manual_seed(0)
    teacher = Glow((4,), depth=4, hidden=16, conditioner="official").double()
    tab_train, tab_val = _tabular()
    with torch.no_grad():  # a teacher with initialised ActNorms, as a trained one has
        teacher.train().encode(tab_train)
    torch.manual_seed(1)
    tab_student = Glow((4,), depth=2, hidden=8, conditioner="official").double()
    torch.manual_seed(2)
    img_student = Glow((1, 8, 8), levels=2, depth=1, hidden=8).double()
    img_train, img_val = _images()
    common = dict(steps=STEPS, batch_size=16, eval_every=3, warmup_steps=2, lr=5e-3, eval_batch_size=32)
    return {
        "tabular-ilkd": (tab_student, teacher, tab_train, tab_val,
                         TrainConfig(name="s", arch="glow", method="ilkd", **common)),
        "image-nll": (img_student, None, img_train, img_val, TrainConfig(name="i", arch="glow", **common)),
    }


def _rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        import flowlib.train as T
        from flowlib.train_ddp import DataParallel

        if rank != 0:  # only rank 0 may touch the checkpoint files
            def refuse(*args, **kwargs):
                raise AssertionError(f"rank {rank} tried to write a checkpoint")

            T.save_checkpoint = refuse
            T.remove_stale_temporaries = refuse
        weights = {}
        for name, (student, teacher, x, val, config) in _cases().items():
            train(student, x, val, config, teacher=teacher, progress=False, distributed=DataParallel(),
                  checkpoint_dir=Path(out) / name)
            weights[name] = {k: v.clone() for k, v in student.state_dict().items()}
        torch.save(weights, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_take_the_steps_of_one_process_with_the_whole_batch(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.set_num_threads(1)
    for name, (student, teacher, x, val, config) in _cases().items():
        before = {k: v.clone() for k, v in student.state_dict().items()}
        train(student, x, val, config, teacher=teacher, progress=False)
        for key, value in student.state_dict().items():
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)  # ranks agree exactly
            if value.is_floating_point():
                assert torch.allclose(ranks[0][name][key], value, rtol=0, atol=1e-6), (name, key)
        moved = max(float((value - before[k]).abs().max()) for k, value in student.state_dict().items()
                    if value.is_floating_point())
        assert moved > 1e-3, name  # the comparison is between trained weights, not two initialisations
        # rank 0 wrote the run's checkpoints, in the single-process format
        ck = load_checkpoint(tmp_path / name / "last.pt")
        assert ck["step"] == STEPS and ck["config"] == config.to_dict()
        assert not list((tmp_path / name).glob("*.tmp*"))


def test_refuses_what_it_cannot_reproduce(tmp_path):
    store = tmp_path / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        from flowlib.train_ddp import DataParallel

        parallel = DataParallel()
        with pytest.raises(ValueError, match="SKD is not supported"):
            parallel.check(TrainConfig(arch="glow", method="skd"))
        with pytest.raises(ValueError, match="MAF is not supported"):
            parallel.check(TrainConfig(arch="maf"))
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="torchrun"):
        DataParallel()


def _torchrun(tmp_path: Path, root: Path) -> subprocess.Popen:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "flowlib.train_ddp",
         "--config", str(tmp_path / "run.json"), "--data", str(tmp_path / "data.pt"),
         "--checkpoint-root", str(root), "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (torchrun starts its workers in sessions of their own, so
    killing the launcher's process group would leave them running)."""
    def descendants(p: int) -> list[int]:
        try:
            children = [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            return []
        return [c for child in children for c in (child, *descendants(child))]

    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_run_killed_under_torchrun_resumes_to_the_uninterrupted_weights(tmp_path):
    x = torch.randn(512, 3, generator=torch.Generator().manual_seed(3))
    torch.save({"train": x[:384], "val": x[384:]}, tmp_path / "data.pt")
    config = TrainConfig(name="ddp", arch="glow", dataset="toy", steps=400, batch_size=32, eval_every=20,
                         model_kwargs={"depth": 2, "hidden": 16})
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    whole = _torchrun(tmp_path, tmp_path / "whole")
    out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, out.decode()[-2000:]

    killed = _torchrun(tmp_path, tmp_path / "killed")
    last = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill the launcher and its workers once a checkpoint is on disk
        found = list((tmp_path / "killed").glob("*/last.pt"))
        if found:
            last = found[0]
            break
        time.sleep(0.02)
    _kill_tree(killed.pid)  # as a machine going down would: the launcher and every worker at once
    killed.wait(timeout=60)
    assert last is not None
    step = load_checkpoint(last)["step"]
    assert step < config.steps, "the run finished before it could be killed"
    resumed = _torchrun(tmp_path, tmp_path / "killed")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out.decode()[-2000:]
    for name in ("last.pt", "best.pt"):
        a = load_checkpoint(next((tmp_path / "whole").glob(f"*/{name}")))
        b = load_checkpoint(next((tmp_path / "killed").glob(f"*/{name}")))
        assert a["step"] == b["step"]
        for key in a["model"]:  # same processes, threads and shapes: the same numbers bit for bit
            assert torch.equal(a["model"][key], b["model"][key]), (name, key)


def _rank_with_own_checkpoints(rank: int, world: int, store: str, dirs: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from flowlib.train_ddp import DataParallel

        student, teacher, x, val, config = _cases()["image-nll"]
        train(student, x, val, config, progress=False, distributed=DataParallel(), checkpoint_dir=dirs[rank])
    finally:
        dist.destroy_process_group()


def test_ranks_that_would_resume_from_different_checkpoints_stop_instead_of_hanging(tmp_path):
    student, _, x, val, config = _cases()["image-nll"]

    def stop_at_4(step, xb):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # leaves last.pt at step 3 (eval_every = 3)
        train(student, x, val, config, progress=False, checkpoint_dir=tmp_path / "b", batch_hook=stop_at_4)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 3
    with pytest.raises(Exception, match="disagree on the step it resumes from"):
        mp.spawn(_rank_with_own_checkpoints, args=(2, str(tmp_path / "store"), [str(tmp_path / "a"),
                                                                              str(tmp_path / "b")]),
                 nprocs=2, join=True)
