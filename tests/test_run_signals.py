"""The runner under Ctrl-C and SIGTERM: the kernel stops within seconds, the interrupted notebook is named
and recorded in run.json, and the exit status says how the run ended."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_run import _notebook

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups and signals are POSIX")


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for its parent to reap it has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _interrupt(tmp_path, send) -> tuple[int, str, dict, int, float]:
    """Start the runner on a notebook that sleeps for minutes, wait until its kernel runs the loop, call
    ``send(runner)``; returns the exit status, the output, run.json, the kernel's pid and the seconds the
    runner took to exit."""
    nbdir, results, marks = tmp_path / "nbs", tmp_path / "results", tmp_path / "marks"
    nbdir.mkdir()
    marks.mkdir()
    _notebook(nbdir / "01_sleeps.ipynb", 'results_dir = "results"', (
        "import os, pathlib, time\n"
        f"pathlib.Path(r'{marks}', 'kernel.pid').write_text(str(os.getpid()))\n"
        "for _ in range(600):\n"
        "    time.sleep(0.5)\n"))
    _notebook(nbdir / "02_never.ipynb", 'results_dir = "results"',
              f"import pathlib\npathlib.Path(r'{marks}', 'never.ran').touch()")
    command = [sys.executable, "-m", "flowlib.run", "--notebook-dir", str(nbdir),
               "-p", "results_dir", str(results), "--output-dir", str(tmp_path / "runs")]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, cwd=tmp_path)
    kernel = None
    try:
        # wait for the kernel to be inside the loop, however slowly it starts on a loaded machine
        assert _wait(lambda: (marks / "kernel.pid").exists() or runner.poll() is not None, 180)
        assert runner.poll() is None, runner.communicate()[0]
        kernel = int((marks / "kernel.pid").read_text())
        sent = time.monotonic()
        send(runner)
        try:
            output = runner.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            pytest.fail("the runner was still running 30 s after the signal")
        took = time.monotonic() - sent
        manifest = json.loads((results / "run.json").read_text())
        assert _wait(lambda: _gone(kernel), 5), "the notebook's kernel outlived the runner"
        assert not (marks / "never.ran").exists()
        return runner.returncode, output, manifest, kernel, took
    finally:  # on failure (the code before this fix), leave nothing running
        for pid in (kernel, runner.pid):
            if pid is not None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
        runner.wait()


def _assert_recorded_as_interrupted(manifest: dict, signame: str) -> None:
    assert manifest["notebooks"]["01_sleeps"]["status"] == "interrupted"
    assert "02_never" not in manifest["notebooks"]
    last = manifest["last_invocation"]
    assert last["interrupted"] is True and last["signal"] == signame and last["finished"]
    assert manifest["invocations"][-1]["notebooks"] == ["01_sleeps"]


def test_ctrl_c_stops_the_kernel_and_records_the_interruption(tmp_path):
    # Ctrl-C in a terminal sends SIGINT to the whole foreground process group
    code, output, manifest, kernel, took = _interrupt(
        tmp_path, lambda runner: os.killpg(runner.pid, signal.SIGINT))
    assert code == 130, output
    assert "interrupted: 01_sleeps" in output and "SIGINT" in output
    assert took < 15, f"the runner took {took:.1f} s to stop"
    _assert_recorded_as_interrupted(manifest, "SIGINT")


def test_sigterm_stops_the_kernel_and_records_the_interruption(tmp_path):
    code, output, manifest, kernel, took = _interrupt(tmp_path, lambda runner: runner.terminate())
    assert code == 143, output
    assert "interrupted: 01_sleeps" in output and "SIGTERM" in output
    assert took < 15, f"the runner took {took:.1f} s to stop"
    _assert_recorded_as_interrupted(manifest, "SIGTERM")
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert [(s["notebook"], s["status"]) for s in summary] == [("01_sleeps", "interrupted")]
