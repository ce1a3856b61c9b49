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


def test_no_run_json_for_notebooks_without_a_results_folder(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _notebook(nbdir / "01_a.ipynb", "n = 1", "pass")
    assert run._results_dir([nbdir / "01_a.ipynb"], {nbdir / "01_a.ipynb": {}}) is None
