"""`make lab` starts JupyterLab for root (which needs --allow-root) and for everyone else."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAMP = ".venv/.flowlib-installed"  # -o: take the environment as built, whatever the Makefile's date

pytestmark = pytest.mark.skipif(shutil.which("make") is None or os.name != "posix", reason="needs make")


def _lab_command(tmp_path, uid: int) -> str:
    """The command `make lab` runs for a user whose `id -u` is ``uid`` (an `id` stand-in on PATH)."""
    bin_dir = tmp_path / f"uid-{uid}"
    bin_dir.mkdir()
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_dir / "id").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["make", "-n", "-s", "-o", STAMP, "lab"], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)
    return [line for line in done.stdout.splitlines() if "jupyter lab" in line][-1]


def test_make_lab_passes_allow_root_to_root_only(tmp_path):
    as_root, as_user = _lab_command(tmp_path, 0), _lab_command(tmp_path, 1000)
    assert "--allow-root" in as_root.split() and "--allow-root" not in as_user.split()
    for command in (as_root, as_user):
        assert command.split()[-1] == "notebooks" and "--no-browser" not in command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_lab_starts_jupyterlab_for_the_current_user(tmp_path):
    port = _free_port()
    env = {**os.environ, "JUPYTER_PORT": str(port), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "BROWSER": "true"}  # "open" the page with `true`: no browser window from a test
    log = tmp_path / "lab.log"
    with open(log, "w") as out:
        # BIN: this environment's scripts, wherever the tree under test is
        command = ["make", "-s", "-o", STAMP, "lab", f"BIN={Path(sys.executable).parent}"]
        lab = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and lab.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=2) as reply:
                    assert reply.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"JupyterLab did not start (exit status {lab.poll()}):\n{log.read_text()[-2000:]}")
    finally:
        try:
            os.killpg(lab.pid, signal.SIGTERM)
            lab.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(lab.pid, signal.SIGKILL)
            lab.wait()
