"""The papermill runner: parameter checking, selection, failure reporting."""

import json

import nbformat
import pytest

from flowlib import run


def _notebook(path, params_src, body_src):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params_src)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body_src)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_unknown_parameter_is_rejected_before_running(capsys):
    code = run.main(["-p", "epochs", "3"])
    err = capsys.readouterr().err
    assert code == 1
    assert "unknown parameter(s) epochs" in err and "Declared parameters:" in err and "seed" in err


def test_unknown_notebook_selection_lists_available(capsys):
    assert run.main(["--only", "99"]) == 1
    assert "matches no notebook" in capsys.readouterr().err


def test_parameter_values_are_typed():
    assert run.parse_value("3") == 3 and run.parse_value("0.5") == 0.5
    assert run.parse_value("true") is True and run.parse_value("magic") == "magic"


def test_fast_and_cli_parameters_go_only_where_declared(tmp_path):
    a, b = tmp_path / "01_a.ipynb", tmp_path / "02_b.ipynb"
    _notebook(a, "fast = False\nseed = 0", "pass")
    _notebook(b, "steps = 10", "pass")
    params = run.build_parameters([a, b], {"seed": 4}, fast=True)
    assert params[a] == {"fast": True, "seed": 4}
    assert params[b] == {}
    with pytest.raises(run.RunnerError, match="unknown parameter"):
        run.build_parameters([b], {"seed": 4}, fast=False)
    # with --only, a parameter file for the whole run is checked against every notebook, not the selection
    assert run.build_parameters([b], {"seed": 4}, fast=False, known_from=[a, b]) == {b: {}}
    with pytest.raises(run.RunnerError, match="unknown parameter"):
        run.build_parameters([b], {"sead": 4}, fast=False, known_from=[a, b])


def test_runs_in_order_and_reports_the_failing_cell(tmp_path, capsys):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _notebook(nbdir / "01_ok.ipynb", "n = 2", "import pathlib\npathlib.Path(r'%s').write_text(str(n * 21))"
              % (tmp_path / "out.txt"))
    _notebook(nbdir / "02_bad.ipynb", "n = 1", "raise ValueError('broken on purpose')")
    out = tmp_path / "runs"
    code = run.main(["--notebook-dir", str(nbdir), "-p", "n", "3", "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert (tmp_path / "out.txt").read_text() == "63"  # the first notebook ran with n = 3
    assert "02_bad.ipynb failed in cell" in captured.err and "broken on purpose" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary] == ["ok", "failed"]
    assert (out / "01_ok.ipynb").exists()


def test_run_json_records_every_notebook_and_merges_later_runs(tmp_path):
    nbdir, results = tmp_path / "nbs", tmp_path / "results"
    nbdir.mkdir()
    for name in ("01_a", "02_b"):
        _notebook(nbdir / f"{name}.ipynb", 'results_dir = "results"\nthreads = 0',
                  "import os\nthreads = os.environ.get('FLOWLIB_THREADS')")
    args = ["--notebook-dir", str(nbdir), "-p", "results_dir", str(results),
            "--output-dir", str(tmp_path / "r")]
    assert run.main(args + ["--threads", "1"]) == 0
    first = json.loads((results / "run.json").read_text())
    assert set(first["notebooks"]) == {"01_a", "02_b"}
    assert all(n["status"] == "ok" and n["seconds"] > 0 for n in first["notebooks"].values())
    assert first["machine"]["torch_threads"] == "1" and first["machine"]["cpus"] >= 1
    assert "--threads 1" in first["last_invocation"]["command"]
    assert first["last_invocation"]["wall_seconds"] > 0
    assert run.main(args + ["--only", "02"]) == 0  # a later partial run replaces only its own entry
    second = json.loads((results / "run.json").read_text())
    assert second["notebooks"]["01_a"] == first["notebooks"]["01_a"]
    assert second["notebooks"]["02_b"]["command"] != first["notebooks"]["02_b"]["command"]
    # both invocations stay on record, oldest first, each with the notebooks it ran and its wall clock
    runs = second["invocations"]
    assert [r["notebooks"] for r in runs] == [["01_a", "02_b"], ["02_b"]]
    assert runs[0]["wall_seconds"] == first["last_invocation"]["wall_seconds"]
    assert "--only 02" in runs[1]["command"] and runs[1]["wall_seconds"] > 0


def test_run_json_names_the_running_invocation_before_its_first_notebook(tmp_path):
    # a notebook that reads run.json (the results notebook) must find the invocation that is running it
    nbdir, results = tmp_path / "nbs", tmp_path / "results"
    nbdir.mkdir()
    _notebook(nbdir / "01_a.ipynb", 'results_dir = "results"', "pass")
    _notebook(nbdir / "02_reads.ipynb", 'results_dir = "results"',
              "import json, pathlib\n"
              "m = json.loads((pathlib.Path(results_dir) / 'run.json').read_text())\n"
              "(pathlib.Path(results_dir) / 'seen.txt').write_text(m['last_invocation']['command'])")
    args = ["--notebook-dir", str(nbdir), "-p", "results_dir", str(results),
            "--output-dir", str(tmp_path / "r")]
    assert run.main(args) == 0
    assert run.main(args + ["--only", "02"]) == 0
    assert "--only 02" in (results / "seen.txt").read_text()


def test_no_run_json_for_notebooks_without_a_results_folder(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _notebook(nbdir / "01_a.ipynb", "n = 1", "pass")
    assert run._results_dir([nbdir / "01_a.ipynb"], {nbdir / "01_a.ipynb": {}}) is None


def _timed_notebook(path, stamp_dir, sleep, extra=""):
    _notebook(path, "n = 0", (
        "import pathlib, time\n"
        f"d = pathlib.Path(r'{stamp_dir}')\n"
        f"(d / '{path.stem}.start').write_text(repr(time.time()))\n"
        f"{extra}"
        f"time.sleep({sleep})\n"
        f"(d / '{path.stem}.end').write_text(repr(time.time()))\n"))


def _wait_for(condition: str, what: str) -> str:
    """Notebook code that polls ``condition`` (a Python expression) for up to 2 minutes, then fails with
    ``what``: the runner tests wait on events, not on sleeps that race a kernel's start-up."""
    return ("for _ in range(1200):\n"
            f"    if {condition}:\n"
            "        break\n"
            "    time.sleep(0.1)\n"
            "else:\n"
            f"    raise TimeoutError({what!r})\n")


def test_jobs_run_notebooks_side_by_side_and_the_results_notebook_last(tmp_path):
    import nbformat

    nbdir, stamps = tmp_path / "nbs", tmp_path / "stamps"
    nbdir.mkdir()
    stamps.mkdir()
    # each waits (up to 2 min) for the other to start, so they finish only if they ran side by side
    for name, other in (("01_a", "02_b"), ("02_b", "01_a")):
        waits = _wait_for(f"(d / '{other}.start').exists()", f"{other} never started alongside")
        _timed_notebook(nbdir / f"{name}.ipynb", stamps, 0.5, extra=waits)
    # the last notebook fails unless both others have finished when it starts
    _timed_notebook(nbdir / "03_results.ipynb", stamps, 0,
                    extra="assert (d / '01_a.end').exists() and (d / '02_b.end').exists()\n")
    last = nbformat.read(nbdir / "03_results.ipynb", as_version=4)
    last.metadata["flowlib"] = {"run_after_others": True}
    nbformat.write(last, nbdir / "03_results.ipynb")
    assert run.runs_after_others(nbdir / "03_results.ipynb")
    assert not run.runs_after_others(nbdir / "01_a.ipynb")
    out = tmp_path / "runs"
    assert run.main(["--notebook-dir", str(nbdir), "--output-dir", str(out), "--jobs", "2"]) == 0
    t = {p.name: float(p.read_text()) for p in stamps.iterdir()}
    assert t["01_a.start"] < t["02_b.end"] and t["02_b.start"] < t["01_a.end"]  # they overlapped
    assert t["03_results.start"] >= max(t["01_a.end"], t["02_b.end"])
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(s["notebook"] for s in summary) == ["01_a", "02_b", "03_results"]
    assert summary[-1]["notebook"] == "03_results" and all(s["status"] == "ok" for s in summary)


def test_jobs_stop_at_the_first_failure(tmp_path, capsys):
    nbdir, stamps = tmp_path / "nbs", tmp_path / "stamps"
    nbdir.mkdir()
    stamps.mkdir()
    out = tmp_path / "runs"
    _notebook(nbdir / "01_bad.ipynb", "n = 1", "raise ValueError('broken on purpose')")
    # 02 finishes only once the runner has recorded 01's failure (summary.json), however slowly 01's kernel
    # starts: a fixed sleep raced against kernel start-up on a loaded machine and let 03 start
    _timed_notebook(nbdir / "02_slow.ipynb", stamps, 0, extra=(
        f"s = pathlib.Path(r'{out}') / 'summary.json'\n"
        + _wait_for("s.exists() and '01_bad' in s.read_text()", "01_bad was never recorded")))
    _timed_notebook(nbdir / "03_never.ipynb", stamps, 0)
    assert run.main(["--notebook-dir", str(nbdir), "--output-dir", str(out), "--jobs", "2"]) == 1
    assert "01_bad.ipynb failed in cell" in capsys.readouterr().err
    summary = {s["notebook"]: s["status"] for s in json.loads((out / "summary.json").read_text())}
    assert summary == {"01_bad": "failed", "02_slow": "ok"}  # the running one finished; nothing new started
    assert not (stamps / "03_never.start").exists()
    assert run.main(["--notebook-dir", str(nbdir), "--jobs", "0"]) == 1
