"""Where notebooks put what they produce, and how it is read back.

Every notebook writes the numbers it produced to ``<results_dir>/<notebook>.json`` with
:func:`save_results`; later notebooks, tests and the final tables read them with :func:`load_results`.
Relative paths are resolved against the repository root (not the working directory), so a notebook gives
the same answer whether it is run from JupyterLab, papermill or a test.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = [
    "atomic_write", "atomic_write_bytes", "atomic_write_json", "load_results", "notebook_setup",
    "project_path", "repo_root", "save_results",
]


def repo_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml`` above this package), else the cwd."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def project_path(path: str | os.PathLike) -> Path:
    """Absolute path: ``path`` itself if absolute, else relative to :func:`repo_root`."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else repo_root() / p


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Create ``path`` atomically: ``write(f)`` fills a temporary file (binary) in the same folder, which
    then replaces ``path`` with ``os.replace``. A crash leaves either the old file or the new one, never a
    half-written file. The one implementation every writer in flowlib uses (results, checkpoints, caches,
    figures)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no NaN/inf; keep it visible instead of failing
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n").encode())


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_results(name: str, data: dict, results_dir: str | os.PathLike = "results",
                 params: dict | None = None) -> Path:
    """Write ``data`` to ``<results_dir>/<name>.json`` with provenance (commit, machine, time, params)."""
    record = {
        "notebook": name,
        "results": data,
        "params": params or {},
        "provenance": {
            "commit": _git_commit(),
            "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cpus)",
            "python": platform.python_version(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    return atomic_write_json(project_path(results_dir) / f"{name}.json", record)


def load_results(name: str, results_dir: str | os.PathLike = "results") -> dict:
    """Read what :func:`save_results` wrote; a clear error says which notebook produces it."""
    path = project_path(results_dir) / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no results at {path}: run the notebook {name!r} first "
            f"(python -m flowlib.run --only {name.split('_')[0]})"
        )
    return json.loads(path.read_text())["results"]


def notebook_setup(fast: bool, results_dir: str,
                   checkpoint_dir: str | None = None) -> tuple[bool, Path, Path]:
    """Resolve a notebook's ``fast`` flag and output folders (the cell below the parameters cell).

    Setting the environment variable ``FLOWLIB_FAST=1`` forces fast mode and redirects the default folders to
    ``results/fast`` and ``checkpoints/fast``: that is how ``pytest --nbval-lax notebooks`` runs the stored
    notebooks quickly without touching the committed full-size results. Fast mode also runs torch on one
    thread (tiny models gain nothing from more). ``FLOWLIB_THREADS=N`` (what
    ``python -m flowlib.run --threads N`` sets) fixes the thread count in any mode.
    """
    if os.environ.get("FLOWLIB_FAST") == "1":
        if not fast:
            results_dir = results_dir if results_dir != "results" else "results/fast"
            if checkpoint_dir == "checkpoints":
                checkpoint_dir = "checkpoints/fast"
        fast = True
    threads = os.environ.get("FLOWLIB_THREADS")
    if fast or threads:
        import torch

        # Tiny models: one thread is several times faster than two fighting over small kernels.
        torch.set_num_threads(int(threads) if threads else 1)
    results_path = project_path(results_dir)
    checkpoint_path = project_path(checkpoint_dir or "checkpoints")
    results_path.mkdir(parents=True, exist_ok=True)
    return fast, results_path, checkpoint_path
