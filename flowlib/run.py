"""``python -m flowlib.run``: execute the notebooks in order with papermill.

Examples::

    python -m flowlib.run --fast                 # every notebook, tiny models (what CI and `make demo` run)
    python -m flowlib.run --only 05 --only 06    # some notebooks
    python -m flowlib.run -p seed 3 -p steps 2000
    python -m flowlib.run -f configs/cpu.yaml    # parameters from a file (a mapping of name -> value)
    python -m flowlib.run -f configs/cpu.yaml --jobs 2 --threads 1   # two notebooks at a time

Executed notebooks go to ``runs/<timestamp>/``. With ``--jobs N``, N notebooks run at once, in order of
their numbers; a notebook whose metadata says ``{"flowlib": {"run_after_others": true}}`` (the results
notebook, which reads everyone's results) waits until all the others have finished. Two notebooks that need
the same model do not both train it: :func:`flowlib.train.train_or_load` holds a lock per configuration.

A parameter that none of the selected notebooks declares is rejected before anything runs (papermill
itself would only warn). The first failing notebook stops the run
with its name and the failing cell, and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
from pathlib import Path

import yaml

from .results import _git_commit, atomic_write_json, project_path

NOTEBOOK_DIR = "notebooks"

# What --fast sets in every notebook that declares these parameters.
FAST_PARAMETERS = {"fast": True, "results_dir": "results/fast", "checkpoint_dir": "checkpoints/fast"}


class RunnerError(RuntimeError):
    """A problem with the request (unknown notebook or parameter), reported before running anything."""


def discover(notebook_dir: str | Path = NOTEBOOK_DIR) -> list[Path]:
    """Notebooks named ``NN_*.ipynb`` in order."""
    folder = project_path(notebook_dir)
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def select(notebooks: list[Path], only: list[str] | None) -> list[Path]:
    if not only:
        return notebooks
    chosen = []
    for key in only:
        hits = [p for p in notebooks if p.name.startswith(key) or p.stem == key]
        if not hits:
            names = ", ".join(p.stem for p in notebooks)
            raise RunnerError(f"--only {key!r} matches no notebook; available: {names}")
        chosen += [h for h in hits if h not in chosen]
    return sorted(chosen)


def declared_parameters(path: Path) -> dict:
    """The notebook's parameters cell, as papermill reads it (cached: the runner asks several times)."""
    return _inspect(str(path), Path(path).stat().st_mtime_ns)


@functools.cache
def _inspect(path: str, mtime_ns: int) -> dict:
    import papermill

    return papermill.inspect_notebook(path)


def parse_value(text: str):
    """``-p`` values are read as YAML scalars: 3 -> int, 0.5 -> float, true -> bool, else string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def build_parameters(notebooks: list[Path], cli: dict, fast: bool,
                     known_from: list[Path] | None = None) -> dict[Path, dict]:
    """Per-notebook parameters; raises :class:`RunnerError` for names that no notebook of ``known_from``
    (default: the selected ones) declares. With ``--only``, the runner checks against every notebook in
    the folder, so one parameter file serves the whole run and any part of it."""
    declared = {p: declared_parameters(p) for p in notebooks}
    reference = declared if known_from is None else {p: declared_parameters(p) for p in known_from}
    known = set().union(*[set(d) for d in reference.values()]) if reference else set()
    unknown = sorted(set(cli) - known)
    if unknown:
        raise RunnerError(
            f"unknown parameter(s) {', '.join(unknown)}: no notebook declares them. "
            f"Declared parameters: {', '.join(sorted(known))}"
        )
    per_notebook = {}
    for path, names in declared.items():
        params = {k: v for k, v in FAST_PARAMETERS.items() if fast and k in names}
        params.update({k: v for k, v in cli.items() if k in names})
        per_notebook[path] = params
    return per_notebook


def _execute(path: str, out: str, parameters: dict, kernel: str) -> tuple[float, tuple | None]:
    """Run one notebook with papermill: ``(seconds, None)``, or ``(seconds, (cell, ename, evalue))`` if a
    cell raised. A plain function of plain values, so a worker process can run it (``--jobs``)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            path, out, parameters=parameters, kernel_name=kernel, cwd=str(Path(path).parent),
            progress_bar=False,
            # the kernel's start-up warnings (e.g. about its local TCP transport) are noise here
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except PapermillExecutionError as err:
        return time.perf_counter() - start, (err.cell_index, err.ename, err.evalue)
    return time.perf_counter() - start, None


def runs_after_others(path: Path) -> bool:
    """Whether the notebook's metadata asks to run after every other selected notebook (``--jobs``)."""
    import json

    meta = json.loads(Path(path).read_text()).get("metadata", {}).get("flowlib", {})
    return bool(meta.get("run_after_others", False))


def run(notebooks: list[Path], parameters: dict[Path, dict], output_dir: Path, kernel: str = "python3",
        log=print, on_progress=None, jobs: int = 1) -> list[dict]:
    """Execute ``notebooks`` in order (``jobs`` at a time); ``on_progress(summary)`` is called after each
    one. The first failure stops the run with :class:`NotebookFailed` (notebooks already running finish)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    summary: list[dict] = []
    total = len(notebooks)

    def record(path: Path, took: float, error) -> None:
        done = len(summary) + 1
        if error is None:
            log(f"[{done}/{total}] {path.stem} ok ({took:.1f} s)")
            summary.append({"notebook": path.stem, "seconds": took, "status": "ok",
                            "parameters": parameters[path]})
        else:
            log(f"[{done}/{total}] {path.stem} FAILED after {took:.1f} s")
            summary.append({"notebook": path.stem, "seconds": took, "status": "failed"})
        atomic_write_json(output_dir / "summary.json", summary)
        if on_progress:
            on_progress(summary)
        if error is not None:
            raise NotebookFailed(path, *error, output_dir / path.name)

    if jobs > 1:
        last = [p for p in notebooks if runs_after_others(p)]
        _run_parallel([p for p in notebooks if p not in last], parameters, output_dir, kernel, jobs, log,
                      record)
    else:
        last = notebooks
    for path in last:
        log(f"{path.stem} ...", flush=True)
        took, error = _execute(str(path), str(output_dir / path.name), parameters[path], kernel)
        record(path, took, error)
    return summary


def _run_parallel(notebooks: list[Path], parameters, output_dir: Path, kernel: str, jobs: int, log,
                  record) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending = list(notebooks)
    running = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    path = pending.pop(0)
                    log(f"{path.stem} started", flush=True)
                    running[pool.submit(_execute, str(path), str(output_dir / path.name), parameters[path],
                                        kernel)] = path
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    took, error = future.result()
                    record(running.pop(future), took, error)
        except NotebookFailed:
            pending.clear()  # nothing new starts; the notebooks already running finish and are recorded
            for future in wait(running).done:
                took, error = future.result()
                try:
                    record(running[future], took, error)
                except NotebookFailed:
                    pass  # the first failure is the one reported
            raise


class NotebookFailed(RuntimeError):
    def __init__(self, path: Path, cell: int, ename: str, evalue: str, output: Path):
        self.path, self.cell, self.ename, self.evalue, self.output = path, cell, ename, evalue, output
        super().__init__(
            f"notebook {path.name} failed in cell {cell}: {ename}: {evalue}\n"
            f"the executed notebook with the traceback is at {output}"
        )


def _results_dir(notebooks: list[Path], params: dict[Path, dict]) -> Path | None:
    """The folder the notebooks write their results to (their ``results_dir`` parameter, as given or as
    declared), where ``run.json`` goes; None if no selected notebook has that parameter."""
    import ast

    for path in notebooks:
        declared = declared_parameters(path)
        if "results_dir" in declared:
            value = params[path].get("results_dir")
            if value is None:
                value = ast.literal_eval(declared["results_dir"]["default"])
            return project_path(value)
    return None


class _Manifest:
    """``<results_dir>/run.json``: the command, commit, machine and wall time behind a folder of results.

    Rewritten after every notebook, so an interrupted run still says how far it got. Entries are kept per
    notebook: running ``--only 08`` later replaces notebook 08's entry and leaves the others as they were.
    ``invocations`` keeps every invocation that wrote to the folder (command, commit, start, wall time and the
    notebooks it ran), oldest first, so a full run's wall clock is not lost when one notebook is re-run.
    """

    def __init__(self, results_dir: Path, output_dir: Path, argv: list[str]):

        self.path = results_dir / "run.json"
        self.ran: dict[str, dict] = {}  # this invocation's notebooks; the others are re-read at every write
        self.invocation = {
            "command": " ".join(["python -m flowlib.run", *argv]),
            "commit": _git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "executed_notebooks": str(output_dir),
        }
        self.machine = {"node": platform.node(), "arch": platform.machine(), "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "torch_threads": os.environ.get("FLOWLIB_THREADS", "torch default")}

    def progress(self, summary: list[dict]) -> None:
        for entry in summary:
            self.ran[entry["notebook"]] = {"seconds": round(entry["seconds"], 1), "status": entry["status"],
                                           **self.invocation}
        self.write()

    def _on_disk(self) -> tuple[dict, list]:
        """The notebook entries and the invocation history now in the file (empty if none or unreadable)."""
        import json

        try:
            found = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}, []
        found = found if isinstance(found, dict) else {}
        notebooks, history = found.get("notebooks"), found.get("invocations")
        notebooks = notebooks if isinstance(notebooks, dict) else {}
        return notebooks, history if isinstance(history, list) else []

    def finish(self, seconds: float) -> None:
        self.invocation["wall_seconds"] = round(seconds, 1)
        self.invocation["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write()

    def write(self) -> None:
        try:
            import torch

            self.machine["torch"] = torch.__version__
        except ImportError:
            pass
        # merge with what is on disk now: another invocation (--only 09 in parallel) may have written since
        on_disk, history = self._on_disk()
        notebooks = {**on_disk, **self.ran}
        this = {**self.invocation, "notebooks": sorted(self.ran)}
        history = [inv for inv in history
                   if not (isinstance(inv, dict) and inv.get("started") == this["started"]
                           and inv.get("command") == this["command"])]
        record = {"last_invocation": self.invocation, "machine": self.machine, "notebooks": notebooks,
                  "notebook_seconds_total": round(sum(n["seconds"] for n in notebooks.values()), 1),
                  "invocations": [*history, this]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowlib.run", description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="tiny models and few steps (same code paths)")
    parser.add_argument("--only", action="append", metavar="NN", help="run only notebooks starting with NN")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[])
    parser.add_argument("-f", "--parameters-file", metavar="YAML", help="a YAML mapping of parameters")
    parser.add_argument("--output-dir", help="where executed notebooks go (default runs/<timestamp>)")
    parser.add_argument("--kernel", default="python3")
    parser.add_argument("--notebook-dir", default=NOTEBOOK_DIR, help="folder of NN_*.ipynb notebooks")
    parser.add_argument("--list", action="store_true", help="list notebooks and their parameters, then exit")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch threads in every notebook (sets FLOWLIB_THREADS; default: torch's own)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="notebooks run at once (default 1); use with --threads so that jobs x threads "
                             "does not exceed the cores")
    args = parser.parse_args(argv)

    try:
        notebooks = select(discover(args.notebook_dir), args.only)
        if not notebooks:
            raise RunnerError(f"no notebooks found in {project_path(args.notebook_dir)}")
        if args.list:
            for p in notebooks:
                params = declared_parameters(p)
                print(f"{p.stem}: " + ", ".join(f"{k}={v['default']}" for k, v in params.items()))
            return 0
        cli: dict = {}
        if args.parameters_file:
            loaded = yaml.safe_load(project_path(args.parameters_file).read_text()) or {}
            if not isinstance(loaded, dict):
                raise RunnerError(f"{args.parameters_file} must hold a mapping of parameter names to values")
            cli.update(loaded)
        cli.update({k: parse_value(v) for k, v in args.parameter})
        params = build_parameters(notebooks, cli, args.fast, known_from=discover(args.notebook_dir))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        output_dir = project_path(args.output_dir or f"runs/{stamp}{'-fast' if args.fast else ''}")
        if args.threads is not None:
            if args.threads < 1:
                raise RunnerError(f"--threads must be at least 1, got {args.threads}")
            os.environ["FLOWLIB_THREADS"] = str(args.threads)  # the kernels inherit it
        if args.jobs < 1:
            raise RunnerError(f"--jobs must be at least 1, got {args.jobs}")
        print(f"running {len(notebooks)} notebook(s) into {output_dir}")
        results_dir = _results_dir(notebooks, params)
        given = sys.argv[1:] if argv is None else list(argv)
        manifest = _Manifest(results_dir, output_dir, given) if results_dir else None
        if manifest:
            manifest.write()  # on record before the first notebook, which may read it (notebook 11 does)
        start = time.perf_counter()
        try:
            run(notebooks, params, output_dir, kernel=args.kernel,
                on_progress=manifest.progress if manifest else None, jobs=args.jobs)
        finally:
            if manifest:
                manifest.finish(time.perf_counter() - start)
        print(f"done in {time.perf_counter() - start:.1f} s; executed notebooks in {output_dir}")
        return 0
    except (RunnerError, NotebookFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
