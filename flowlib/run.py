"""Execute the notebooks in order with papermill: python -m flowlib.run.

Examples:

    python -m flowlib.run --fast                 # every notebook, tiny models (what CI and make demo run)
    python -m flowlib.run --only 05 --only 06    # some notebooks
    python -m flowlib.run -p seed 3 -p steps 2000
    python -m flowlib.run --only 04 -p archs '[maf]'   # a list parameter takes a list
    python -m flowlib.run -f configs/cpu.yaml    # parameters from a file (a mapping of name -> value)
    python -m flowlib.run -f configs/cpu.yaml --jobs 2 --threads 1   # two notebooks at a time
    python -m flowlib.run -f configs/paper.yaml  # the paper's sets and models (04-08, 11; a GPU)
    python -m flowlib.run -f configs/paper.yaml --dry-run   # count and plan them, train nothing

Executed notebooks go to runs/<timestamp>/. With --jobs N, N notebooks run at once, in order of their
numbers; a notebook whose metadata says {"flowlib": {"run_after_others": true}} (the results notebook, which
reads everyone's results) waits until all the others have finished. Two notebooks that need the same model
do not both train it: flowlib.train.train_or_load holds a lock per configuration.

Parameters are checked before anything runs (papermill itself would only warn). A -p name must be declared
by one of the selected notebooks; a name in a -f file by some notebook of the folder, so that one file serves
the whole run and any part of it. Each value must have the type of the notebook's default: a list parameter
takes a list (-p archs '[maf]'), an int parameter an int.

The first failing notebook stops the run with its name and the failing cell as Jupyter shows it (In [n]);
the exit status is 1. Ctrl-C (SIGINT) or SIGTERM stops the running notebooks and their kernels within
seconds, records them as interrupted in run.json and exits with 130 or 143; the same command then resumes
from the checkpoints already trained.
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import pickle
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .results import _git_commit, atomic_write_json, project_path, repo_root
from .run_parameters import (  # noqa: F401  (re-exported: part of the runner's interface)
    FAST_PARAMETERS,
    RunnerError,
    build_parameters,
    check_value,
    declared_parameters,
    load_parameters_file,
    parse_value,
)

NOTEBOOK_DIR = "notebooks"

# The signals that stop a run cleanly (Ctrl-C, kill).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# How long a stopped notebook's worker and kernel get to exit after SIGTERM before SIGKILL.
STOP_GRACE_SECONDS = 3.0


def discover(notebook_dir: str | Path = NOTEBOOK_DIR) -> list[Path]:
    """Notebooks named ``NN_*.ipynb`` in order."""
    folder = project_path(notebook_dir)
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def select(notebooks: list[Path], only: list[str] | None) -> list[Path]:
    """The notebooks whose names start with one of ``only`` (all of them if ``only`` is empty), in order."""
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


def _display(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (what run.json and messages show)."""
    try:
        return str(Path(path).resolve().relative_to(repo_root().resolve()))
    except ValueError:
        return str(path)


def _worker() -> None:
    """A notebook's worker process. :class:`_Worker` runs this function's source with ``python -c`` (it
    imports nothing from flowlib, so a worker does not import torch): it reads the pickled
    ``(notebook, output, parameters, kernel, result_file)`` from stdin, executes the notebook with papermill
    and writes the pickled ``(seconds, error)`` to ``result_file``; ``error`` is None, or ``(execution count,
    cell index, cell source, exception name, message)`` for the failing cell."""
    import os
    import pickle
    import sys
    import threading
    import time
    from pathlib import Path

    path, out, parameters, kernel, result = pickle.load(sys.stdin.buffer)
    start = time.perf_counter()
    runner = os.getppid()

    def orphaned() -> None:  # the runner was killed (SIGKILL) before it could stop this worker: end too,
        while os.getppid() == runner:  # and the kernel, which watches this process, ends a second later
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()

    import papermill
    from papermill.exceptions import PapermillExecutionError

    error = None
    try:
        papermill.execute_notebook(
            path, out, parameters=parameters, kernel_name=kernel, cwd=str(Path(path).parent),
            progress_bar=False,
            # the kernel's start-up warnings (e.g. about its local TCP transport) are noise here
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except PapermillExecutionError as err:
        error = (err.exec_count, err.cell_index, err.source, err.ename, err.evalue)
    except Exception as err:  # the kernel died, papermill could not start it...: the notebook failed
        error = (None, None, "", type(err).__name__, str(err))
    Path(result).write_bytes(pickle.dumps((time.perf_counter() - start, error)))


@functools.cache
def _worker_code() -> str:
    import inspect
    import textwrap

    return f"# flowlib.run worker\n{textwrap.dedent(inspect.getsource(_worker))}\n_worker()\n"


class _Worker:
    """One notebook executing in a child process that leads a process session of its own, so that a Ctrl-C
    in the terminal reaches only the runner, which then stops the worker and its kernel (:func:`_stop`)."""

    def __init__(self, path: Path, output: Path, parameters: dict, kernel: str):
        self.path, self.output = path, output
        fd, self._result = tempfile.mkstemp(prefix="flowlib-run-", suffix=".pickle")
        os.close(fd)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-c", _worker_code()], stdin=subprocess.PIPE,
                                     start_new_session=True)
        try:
            with self.proc.stdin as pipe:
                pickle.dump((str(path), str(output), parameters, kernel, self._result), pipe)
        except BrokenPipeError:
            pass  # the worker died at once: outcome() says so

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def outcome(self) -> tuple[float, tuple | None]:
        """``(seconds, error)`` of a worker that has exited (see :func:`_worker`)."""
        took = self.seconds()
        try:
            took, error = pickle.loads(Path(self._result).read_bytes())
        except (OSError, EOFError, pickle.UnpicklingError):
            error = (None, None, "", "WorkerError",
                     f"its worker process exited with status {self.proc.returncode} (see the messages above)")
        Path(self._result).unlink(missing_ok=True)
        return took, error

    def discard(self) -> None:
        Path(self._result).unlink(missing_ok=True)


def _stop(workers: list[_Worker], grace: float = STOP_GRACE_SECONDS) -> None:
    """End ``workers`` and every process they started, kernels included: SIGTERM to each of their process
    groups (a Jupyter kernel leads a session of its own), SIGKILL to what is left after ``grace`` seconds."""
    try:
        import psutil
    except ImportError:  # then only the workers' groups: a kernel exits by itself once its parent has gone
        psutil = None
    below = []
    for w in workers:
        if psutil is not None:
            try:
                below += psutil.Process(w.proc.pid).children(recursive=True)
            except psutil.Error:
                pass
    groups = {w.proc.pid for w in workers}  # each worker leads its own group (start_new_session)
    for p in below:
        try:
            groups.add(os.getpgid(p.pid))
        except OSError:
            pass
    groups.discard(os.getpgrp())

    def alive() -> bool:
        if any(w.proc.poll() is None for w in workers):
            return True
        for p in below:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    return True
            except psutil.Error:
                pass
        return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except OSError:
                pass
        if sig == signal.SIGKILL:
            for p in below:  # in case one left its group
                try:
                    p.kill()
                except psutil.Error:
                    pass
        deadline = time.monotonic() + grace
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive():
            break
    for w in workers:
        w.proc.wait()
        w.discard()


def runs_after_others(path: Path) -> bool:
    """Whether the notebook's metadata asks to run after every other selected notebook (``--jobs``)."""
    import json

    meta = json.loads(Path(path).read_text()).get("metadata", {}).get("flowlib", {})
    return bool(meta.get("run_after_others", False))


def run(notebooks: list[Path], parameters: dict[Path, dict], output_dir: Path, kernel: str = "python3",
        log=print, on_progress=None, jobs: int = 1, stop=None) -> list[dict]:
    """Execute ``notebooks`` in order, ``jobs`` at a time, each in a worker process of its own (with its
    kernel); ``on_progress(summary)`` is called after each one. The first failure stops the run with
    :class:`NotebookFailed` (notebooks already running finish first). ``stop()``, polled while notebooks
    run, returns a signal number to stop everything at once: the running notebooks and their kernels are
    ended, recorded as interrupted, and :class:`Interrupted` is raised."""
    output_dir.mkdir(parents=True, exist_ok=True)
    summary: list[dict] = []
    total = len(notebooks)
    failure: list[NotebookFailed] = []

    def record(path: Path, took: float, status: str, error=None) -> None:
        done = len(summary) + 1
        entry = {"notebook": path.stem, "seconds": took, "status": status}
        if status == "ok":
            log(f"[{done}/{total}] {path.stem} ok ({took:.1f} s)", flush=True)
            entry["parameters"] = parameters[path]
        else:
            log(f"[{done}/{total}] {path.stem} {status.upper()} after {took:.1f} s", flush=True)
        summary.append(entry)
        atomic_write_json(output_dir / "summary.json", summary)
        if on_progress:
            on_progress(summary)
        if error is not None and not failure:
            failure.append(NotebookFailed(path, error, output_dir / path.name))

    last = [p for p in notebooks if jobs > 1 and runs_after_others(p)]
    running: list[_Worker] = []
    try:
        for batch, width in (([p for p in notebooks if p not in last], jobs), (last, 1)):
            pending = list(batch)
            while True:
                for w in [w for w in running if w.proc.poll() is not None]:
                    running.remove(w)
                    took, error = w.outcome()
                    record(w.path, took, "ok" if error is None else "failed", error)
                signum = stop() if stop else None
                if signum:
                    raise Interrupted(signum, [], output_dir)
                while pending and not failure and len(running) < width:
                    path = pending.pop(0)
                    log(f"{path.stem} {'...' if width == 1 else 'started'}", flush=True)
                    running.append(_Worker(path, output_dir / path.name, parameters[path], kernel))
                if not running:
                    break
                time.sleep(0.1)
            if failure:
                raise failure[0]
    except Interrupted as err:
        stopped = [(w.path, w.seconds()) for w in running]
        _stop(running)
        for path, took in stopped:
            record(path, took, "interrupted")
        raise Interrupted(err.signum, stopped, output_dir) from None
    except BaseException:
        _stop(running)  # whatever went wrong here, no worker or kernel outlives the runner
        raise
    return summary


class NotebookFailed(RuntimeError):
    """A notebook raised: names the cell as Jupyter shows it (In [n]) and where the executed notebook is."""

    def __init__(self, path: Path, error: tuple, output: Path):
        exec_count, cell_index, source, ename, evalue = error
        self.path, self.output, self.ename, self.evalue = path, output, ename, evalue
        self.exec_count, self.cell_index = exec_count, cell_index
        cell = ""
        if exec_count is not None:
            cell = f" in cell In [{exec_count}]"
        elif cell_index is not None:
            cell = f" in cell {cell_index + 1} of the executed notebook"
        lines = [f"notebook {path.name} failed{cell}: {ename}: {evalue}"]
        first = next((line.strip() for line in (source or "").splitlines() if line.strip()), None)
        if first:
            number = _code_cell_number(path, source)
            which = f" (code cell {number} of {_display(path)})" if number else ""
            lines.append(f"  that cell{which} starts: {first}")
        lines.append(f"  the executed notebook, with the traceback, is at {_display(output)}")
        super().__init__("\n".join(lines))


def _code_cell_number(path: Path, source: str) -> int | None:
    """The number (from 1) of the code cell of notebook ``path`` whose source is ``source``, if one is."""
    import json

    try:
        cells = json.loads(Path(path).read_text()).get("cells", [])
        cells = [c for c in cells if c.get("cell_type") == "code"]
    except (OSError, ValueError, AttributeError):
        return None
    for number, cell in enumerate(cells, 1):
        text = cell.get("source", "")
        if (text if isinstance(text, str) else "".join(text)) == source:
            return number
    return None


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run; ``stopped`` holds the notebooks then running, with their seconds."""

    def __init__(self, signum: int, stopped: list[tuple[Path, float]], output_dir: Path):
        self.signum, self.stopped = signum, stopped
        name = signal.Signals(signum).name
        if stopped:
            which = ", ".join(f"{p.stem} (after {took:.1f} s)" for p, took in stopped)
            message = (f"{which} {'was' if len(stopped) == 1 else 'were'} stopped by {name}; the partly "
                       f"executed notebook{'s are' if len(stopped) > 1 else ' is'} in {_display(output_dir)}")
        else:
            message = f"stopped by {name} while no notebook was running"
        super().__init__(f"{message}. Finished notebooks and trained checkpoints are kept: running the same "
                         "command again resumes from them.")


class _Signals:
    """While active (a ``with`` block), SIGINT and SIGTERM are only recorded: :meth:`received` is polled
    where the runner can stop cleanly (before starting, and between checks of its running notebooks)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def received(self) -> int | None:
        return self.signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _results_dir(notebooks: list[Path], params: dict[Path, dict]) -> Path | None:
    """The folder the notebooks write their results to (their ``results_dir`` parameter, as given or as
    declared), where ``run.json`` goes; None if no selected notebook has that parameter."""
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
    Paths inside the repository are recorded relative to it, so the file reads the same on any machine.
    """

    def __init__(self, results_dir: Path, output_dir: Path, argv: list[str]):

        self.path = results_dir / "run.json"
        self.ran: dict[str, dict] = {}  # this invocation's notebooks; the others are re-read at every write
        self.invocation = {
            "command": " ".join(["python -m flowlib.run", *argv]),
            "commit": _git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "executed_notebooks": _display(output_dir),
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

    def finish(self, seconds: float, signum: int | None = None) -> None:
        """Record the end of the invocation; ``signum``: the signal that interrupted it, if one did."""
        self.invocation["wall_seconds"] = round(seconds, 1)
        self.invocation["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if signum:
            self.invocation["interrupted"] = True
            self.invocation["signal"] = signal.Signals(signum).name
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flowlib.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="tiny models and few steps (same code paths)")
    parser.add_argument("--only", action="append", metavar="NN", help="run only notebooks starting with NN")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                        help="set a parameter of the notebooks that declare it; VALUE is read as YAML "
                             "(3, 0.5, true, '[glow, maf]', text)")
    parser.add_argument("-f", "--parameters-file", metavar="YAML",
                        help="a YAML mapping of parameter names to values (-p wins over it); a relative "
                             "path is taken from the current folder")
    parser.add_argument("--output-dir", help="where executed notebooks go (default runs/<timestamp>; a "
                                             "relative path is taken from the repository root)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel to run them in (default python3)")
    parser.add_argument("--notebook-dir", default=NOTEBOOK_DIR,
                        help="folder of NN_*.ipynb notebooks (default notebooks, in the repository root)")
    parser.add_argument("--list", action="store_true", help="list notebooks and their parameters, then exit")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch threads in every notebook (sets FLOWLIB_THREADS; default: torch's own)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with a paper-scale parameters file (configs/paper.yaml): build, count and plan "
                             "every model of the paper and open its data; train nothing")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="notebooks run at once (default 1); use with --threads so that jobs x threads "
                             "does not exceed the cores")
    return parser


def _writable_folder(path: Path, what: str) -> None:
    """Create ``path`` if needed and check that files can be written in it; :class:`RunnerError` if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise RunnerError(f"cannot write {what} to {path}: {err.strerror or err}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with _Signals() as signals:
        try:
            return _main(args, sys.argv[1:] if argv is None else list(argv), signals)
        except (RunnerError, NotebookFailed) as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
        except Interrupted as err:
            print(f"interrupted: {err}", file=sys.stderr, flush=True)
            return 128 + err.signum


def _main(args: argparse.Namespace, given: list[str], signals: _Signals) -> int:
    notebooks = select(discover(args.notebook_dir), args.only)
    if not notebooks:
        raise RunnerError(f"no notebooks found in {project_path(args.notebook_dir)}")
    if args.list:
        for p in notebooks:
            params = declared_parameters(p)
            print(f"{p.stem}: " + ", ".join(f"{k}={v['default']}" for k, v in params.items()))
        return 0
    from_file = load_parameters_file(args.parameters_file) if args.parameters_file else {}
    cli = {k: parse_value(v) for k, v in args.parameter}
    scale = cli.get("scale", from_file.get("scale", "cpu"))
    if args.dry_run:
        return _paper_scale_dry_run(args, from_file, cli, scale)
    if scale != "cpu":
        notebooks, from_file, cli = _paper_scale_notebooks(args, notebooks, from_file, cli, scale)
    params = build_parameters(notebooks, cli, args.fast, known_from=discover(args.notebook_dir),
                              from_file=from_file, file_name=args.parameters_file or "",
                              cli_text=dict(args.parameter))
    if args.threads is not None:
        if args.threads < 1:
            raise RunnerError(f"--threads must be at least 1, got {args.threads}")
        os.environ["FLOWLIB_THREADS"] = str(args.threads)  # the kernels inherit it
    if args.jobs < 1:
        raise RunnerError(f"--jobs must be at least 1, got {args.jobs}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output_dir = project_path(args.output_dir or f"runs/{stamp}{'-fast' if args.fast else ''}")
    _writable_folder(output_dir, "executed notebooks (--output-dir)")
    results_dir = _results_dir(notebooks, params)
    manifest = _Manifest(results_dir, output_dir, given) if results_dir else None
    if manifest:
        try:
            manifest.write()  # on record before the first notebook, which may read it (notebook 11 does)
        except OSError as err:
            raise RunnerError(f"cannot write {manifest.path}: {err.strerror or err}") from None
    published: set[str] = set()

    def on_progress(summary: list[dict]) -> None:
        # each notebook is published as soon as it finishes, so a run cut short (a machine shut down, not
        # only a signal) still publishes every notebook whose results it wrote
        manifest.progress(summary)
        if not args.fast:
            done = sorted(e["notebook"] for e in summary
                          if e["status"] == "ok" and e["notebook"] not in published)
            published.update(done)
            _publish(results_dir, done)

    start = time.perf_counter()
    signum = None
    try:
        if signals.received():  # while the notebooks were being checked
            raise Interrupted(signals.received(), [], output_dir)
        print(f"running {len(notebooks)} notebook(s) into {_display(output_dir)}", flush=True)
        run(notebooks, params, output_dir, kernel=args.kernel,
            on_progress=on_progress if manifest else None, jobs=args.jobs, stop=signals.received)
    except Interrupted as err:
        signum = err.signum
        raise
    finally:
        if manifest:
            manifest.finish(time.perf_counter() - start, signum)
    print(f"done in {time.perf_counter() - start:.1f} s; executed notebooks in {_display(output_dir)}")
    return 0


#: keys of a paper-scale parameters file (configs/paper.yaml) that only the dry run reads, and its
#: flowlib.paper_scale.dry_run arguments; the other keys are the notebooks' parameters
DRY_RUN_KEYS = {"image_datasets": "images", "synthetic": "synthetic"}


def _paper_scale_dry_run(args: argparse.Namespace, from_file: dict, cli: dict, scale: str) -> int:
    """``-f configs/paper.yaml --dry-run``: :func:`flowlib.paper_scale.dry_run` of the file's sets, with the
    budget its ``scale`` names ("paper" or "official")."""
    if scale not in ("paper", "official"):
        raise RunnerError("--dry-run plans the paper's scale: give it a paper-scale parameters file, e.g. "
                          "-f configs/paper.yaml (one with 'scale: paper' or 'scale: official')")
    values = {**from_file, **cli}  # -p wins, as for notebooks
    declared = [set(declared_parameters(p)) for p in discover(args.notebook_dir)]
    known = set(DRY_RUN_KEYS).union(*declared)
    unknown = sorted(set(values) - known)
    if unknown:
        raise RunnerError(f"{args.parameters_file or '-p'}: unknown key(s) {unknown}: neither a dry-run key "
                          f"({', '.join(DRY_RUN_KEYS)}) nor a notebook parameter")
    from .data_sources import DataNotAvailableError
    from .paper_scale import IMAGE_SETS, TABULAR_SETS, dry_run

    kwargs = {DRY_RUN_KEYS[k]: v for k, v in values.items() if k in DRY_RUN_KEYS}
    kwargs.setdefault("images", [values["image_dataset"]] if "image_dataset" in values else list(IMAGE_SETS))
    try:
        dry_run(tabular=values.get("tabular_datasets", TABULAR_SETS),
                archs=values.get("archs", ("glow", "maf")), budget=scale, **kwargs)
    except (DataNotAvailableError, ValueError) as err:
        raise RunnerError(str(err)) from None
    return 0


def _paper_scale_notebooks(args: argparse.Namespace, notebooks: list[Path], from_file: dict, cli: dict,
                           scale: str) -> tuple[list[Path], dict, dict]:
    """Before a paper-scale run (``scale`` "paper" or "official"): keep the notebooks that take a ``scale``
    (04-08 and 11), send results and checkpoints to their own folders (``results/<scale>`` unless the file
    names others; ``.../fast`` with ``--fast``), and check that every set is one of the paper's and on disk,
    so that a missing one gives its "how to get it" error before anything trains."""
    from .data_sources import DataNotAvailableError
    from .paper_scale import check_data, check_scale, preset_name

    try:
        check_scale(scale)
    except ValueError as err:
        raise RunnerError(str(err)) from None
    from_file = {k: v for k, v in from_file.items() if k not in DRY_RUN_KEYS}
    roots = {"results_dir": "results", "checkpoint_dir": "checkpoints"}
    folders = {key: str(cli.get(key, from_file.get(key, f"{root}/{scale}"))) for key, root in roots.items()}
    for key, folder in folders.items():
        if Path(folder).as_posix().rstrip("/") in (roots[key], f"{roots[key]}/fast"):
            raise RunnerError(f"{key} {folder!r} holds the CPU-scale results: a paper-scale run writes to "
                              f"its own folder (e.g. {roots[key]}/{scale})")
    if args.fast:  # the same models and sets, a few steps each: a smoke test that never touches real results
        folders = {key: f"{folder}/fast" for key, folder in folders.items()}
    from_file = {**from_file, **folders, "fast": bool(args.fast)}
    cli = {k: v for k, v in cli.items() if k not in folders}  # now in the file's values, with /fast
    taking = [p for p in notebooks if "scale" in declared_parameters(p)]
    if not taking:
        raise RunnerError(f"none of {', '.join(p.stem for p in notebooks)} runs at the paper's scale; the "
                          f"notebooks that do: 04-08 and 11")
    left = [p.stem for p in notebooks if p not in taking]
    if left:
        print(f"at the paper's scale: {', '.join(p.stem for p in taking)}; not run: {', '.join(left)} (they "
              f"have no paper-scale version: 01-03 do not train, 09 and 10 are not the paper's tables)",
              flush=True)
    values = {**from_file, **cli}
    tabular = list(values.get("tabular_datasets", []))
    image = values.get("image_dataset")
    try:
        for arch in values.get("archs", ("glow", "maf")):
            for dataset in tabular:
                preset_name(arch, dataset, "teacher")
        if image is not None:
            preset_name("glow", image, "teacher")
        check_data(tabular, [image] if image else [])
    except (DataNotAvailableError, ValueError) as err:
        raise RunnerError(str(err)) from None
    return taking, from_file, cli


def _publish(results_dir: Path, names: list[str]) -> None:
    """Copy this run's executed notebooks, with their outputs, to ``<results_dir>/notebooks/``
    (:mod:`flowlib.publish`); a problem there is reported, not fatal: the results are already written."""
    from .publish import publish_notebooks

    if not names:
        return
    try:
        paths = publish_notebooks(results_dir, names)
    except (OSError, ValueError) as err:
        print(f"warning: executed notebooks not published: {err}", file=sys.stderr, flush=True)
        return
    print(f"published {len(paths)} executed notebook(s) to {_display(paths[0].parent)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
