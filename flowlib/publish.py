"""Publish the executed notebooks of a full-scale run beside its results, with their outputs.

The notebooks in ``notebooks/`` are stored without outputs; the runner (``python -m flowlib.run``) writes
the executed copies under ``runs/<timestamp>/`` (not committed) and records in ``<results>/run.json``
which run produced each notebook's results. This module copies, for every notebook in that record, the
executed copy it names into ``<results>/notebooks/`` (``results/notebooks/`` for the committed full-scale
results), so that a reader sees every table and figure on the repository's web page without running
anything. Each published notebook carries its provenance in its metadata (``metadata.flowlib``: commit,
command, start time, executed folder), equal to its entry in ``run.json``.

The runner publishes each notebook of a full-scale run as soon as it finishes (so a run cut short still
publishes what it finished); ``python -m flowlib.publish`` (re)does it for every notebook of ``run.json``. A
notebook whose executed copy holds an error output is refused. A ``run.json`` entry may say
``"executed_copy_lost"`` (why): its results were written but its executed copy never published, so the
published copy stays that of the earlier invocation it names in ``published_from``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowlib.results import atomic_write_bytes, project_path, repo_root

__all__ = ["PROVENANCE_KEYS", "error_outputs", "provenance", "publish_notebooks", "main"]

PROVENANCE_KEYS = ("commit", "command", "started", "executed_notebooks")
# outputs a reader of a static page cannot use: live widgets (tqdm bars) render as nothing there
_DROPPED_MIME = ("application/vnd.jupyter.widget-view+json",)


def error_outputs(notebook: dict) -> list[tuple[int, str]]:
    """``(cell index, error name)`` of every error output in a notebook (as parsed JSON)."""
    return [(i, out.get("ename", "?")) for i, cell in enumerate(notebook.get("cells", []))
            for out in cell.get("outputs", []) if out.get("output_type") == "error"]


def provenance(notebook: dict) -> dict:
    """The provenance a published notebook carries (empty if it has none)."""
    return notebook.get("metadata", {}).get("flowlib", {}).get("provenance", {})


def _slim(notebook: dict) -> dict:
    """Drop outputs a static page cannot show and progress-bar noise on stderr."""
    for cell in notebook.get("cells", []):
        kept = []
        for out in cell.get("outputs", []):
            data = out.get("data")
            if data:
                for mime in _DROPPED_MIME:
                    data.pop(mime, None)
                if not data:
                    continue
            if out.get("output_type") == "stream" and out.get("name") == "stderr" and "it/s" in "".join(
                    out.get("text", "")):
                continue
            kept.append(out)
        if cell.get("cell_type") == "code":
            cell["outputs"] = kept
    return notebook


def publish_notebooks(results_dir: Path | str | None = None, names: list[str] | None = None) -> list[Path]:
    """Copy the executed copy of each notebook of ``<results_dir>/run.json`` (or only ``names``) into
    ``<results_dir>/notebooks/``, stamped with its provenance; returns the written paths.

    ``FileNotFoundError`` if ``run.json`` or an executed copy it names is missing (re-run that notebook with
    the command the error gives), ``ValueError`` if an executed copy holds an error output."""
    results_dir = Path(results_dir) if results_dir is not None else project_path("results")
    record_path = results_dir / "run.json"
    if not record_path.exists():
        raise FileNotFoundError(f"no {record_path}: run the notebooks first (python -m flowlib.run ...)")
    entries = json.loads(record_path.read_text()).get("notebooks", {})
    unknown = sorted(set(names or []) - set(entries))
    if unknown:
        raise ValueError(f"{record_path} has no entry for {unknown}; it records {sorted(entries)}")
    out_dir = results_dir / "notebooks"
    written = []
    for name in names or sorted(entries):
        entry = entries[name]
        if entry.get("status") != "ok":
            raise ValueError(f"{name} did not finish in its last run (status {entry.get('status')!r}); "
                             f"re-run it")
        source = repo_root() / entry["executed_notebooks"] / f"{name}.ipynb"
        if entry.get("executed_copy_lost") and not source.exists():
            if names:  # asked for by name: say why there is nothing to publish
                raise FileNotFoundError(
                    f"the executed copy of {name} was lost ({entry['executed_copy_lost']}); re-run it to "
                    f"publish it: python -m flowlib.run <the same options> --only {name[:2]} (run.json: "
                    f"{entry.get('command')})")
            continue  # its published copy stays the one of the invocation in ``published_from``
        if not source.exists():
            raise FileNotFoundError(
                f"the executed copy of {name} ({source}) is gone; re-run it to publish it: python -m "
                f"flowlib.run <the same options> --only {name[:2]} (run.json: {entry.get('command')})")
        notebook = json.loads(source.read_text())
        errors = error_outputs(notebook)
        if errors:
            raise ValueError(f"{source} has error outputs (cell, error): {errors}; not publishing it")
        notebook = _slim(notebook)
        notebook.setdefault("metadata", {})["flowlib"] = {
            "provenance": {key: entry.get(key) for key in PROVENANCE_KEYS}}
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{name}.ipynb"
        # the layout nbformat writes (one-space indent, sorted keys), so that a diff reads as usual
        text = json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        atomic_write_bytes(target, text.encode())
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowlib.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=None, help="default: results")
    parser.add_argument("names", nargs="*", help="notebooks to publish (default: every one in run.json)")
    args = parser.parse_args(argv)
    try:
        paths = publish_notebooks(args.results_dir, args.names or None)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    total = sum(p.stat().st_size for p in paths)
    print(f"published {len(paths)} notebooks ({total / 1e6:.1f} MB) to {paths[0].parent if paths else '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
