"""The papermill runner: parameter checking, selection, failure reporting."""

import json
import os
import re
from pathlib import Path

import nbformat
import pytest

from flowlib import run

ROOT = Path(__file__).resolve().parents[1]


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
    assert run.build_parameters([b], {}, fast=False, known_from=[a, b], from_file={"seed": 4}) == {b: {}}
    with pytest.raises(run.RunnerError, match="unknown parameter"):
        run.build_parameters([b], {}, fast=False, known_from=[a, b], from_file={"sead": 4})
    # ... but a parameter given on the command line must be declared by a selected notebook
    with pytest.raises(run.RunnerError, match="seed is declared only by 01_a"):
        run.build_parameters([b], {"seed": 4}, fast=False, known_from=[a, b])


def test_runs_in_order_and_reports_the_failing_cell(tmp_path, capsys):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _notebook(nbdir / "01_ok.ipynb", "n = 2", "import pathlib\npathlib.Path(r'%s').write_text(str(n * 21))"
              % (tmp_path / "out.txt"))
    _notebook(nbdir / "02_bad.ipynb", "n = 1", "x = n + 1")
    bad = nbformat.read(nbdir / "02_bad.ipynb", as_version=4)
    bad.cells += [nbformat.v4.new_markdown_cell("# the cell below fails"),
                  nbformat.v4.new_code_cell("\n# fails on purpose\nraise ValueError('broken on purpose')")]
    nbformat.write(bad, nbdir / "02_bad.ipynb")
    out = tmp_path / "runs"
    code = run.main(["--notebook-dir", str(nbdir), "-p", "n", "3", "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert (tmp_path / "out.txt").read_text() == "63"  # the first notebook ran with n = 3
    # named as Jupyter shows it in the executed notebook: the parameters cell is In [1], papermill's
    # injected parameters In [2], x = n + 1 In [3]; and as the third code cell of the notebook itself
    assert "02_bad.ipynb failed in cell In [4]: ValueError: broken on purpose" in captured.err
    assert "(code cell 3 of " in captured.err and "starts: # fails on purpose" in captured.err
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


def _never_run(nbdir, name, params_src):
    """A notebook that must not run: the tests below expect the runner to refuse the request first."""
    _notebook(nbdir / f"{name}.ipynb", params_src, "raise RuntimeError('this notebook must not run')")


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_parameter_values_must_have_the_type_of_the_declared_default(tmp_path, capsys):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _never_run(nbdir, "01_a", 'seed = 0\narchs = ["glow", "maf"]\nseeds = [0, 1, 2]\nlr = 0.001\n'
                              'fast = False\nname = "x"\nanything = None')
    base = ["--notebook-dir", str(nbdir), "--output-dir", str(tmp_path / "runs")]

    def refused(*args) -> str:
        assert run.main(base + list(args)) == 1
        return _one_error_line(capsys)

    err = refused("-p", "archs", "maf")
    assert ("parameter 'archs' of 01_a expects a list of str such as [\"glow\", \"maf\"], got the str 'maf'; "
            "write -p archs '[maf]'") in err
    err = refused("-p", "seed", "abc")
    assert "parameter 'seed' of 01_a expects an int such as 0, got the str 'abc'" in err
    assert "parameter 'seeds' of 01_a expects a list of int" in refused("-p", "seeds", "3")
    assert "write -p seeds '[3]'" in refused("-p", "seeds", "3")
    assert "parameter 'seeds'" in refused("-p", "seeds", "[a, b]")  # the elements are checked too
    assert "parameter 'seed' of 01_a expects an int" in refused("-p", "seed", "true")  # a bool is no int
    assert "parameter 'fast' of 01_a expects a bool" in refused("-p", "fast", "1")
    assert "parameter 'lr' of 01_a expects a float" in refused("-p", "lr", "fast")
    # a parameters file is checked the same way, and named
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: abc\n")
    assert f"parameter 'seed' of 01_a (in {bad}) expects an int such as 0" in refused("-f", str(bad))
    assert not (tmp_path / "runs").exists()  # refused before anything ran
    # what fits: an int where a float is declared (made a float), any text for a str, anything for None
    a = nbdir / "01_a.ipynb"
    cli = {"lr": 1, "name": 2024, "archs": ["maf"], "seeds": [], "anything": [1, "x"], "seed": 3}
    params = run.build_parameters([a], cli, fast=False, cli_text={"name": "2024"})[a]
    assert params == {**cli, "lr": 1.0, "name": "2024"} and isinstance(params["lr"], float)
    with pytest.raises(run.RunnerError, match="parameter 'name' of 01_a .* expects a str"):
        run.build_parameters([a], {}, fast=False, from_file={"name": 2024})  # YAML typed in a file


def test_command_line_parameters_must_be_declared_by_a_selected_notebook(tmp_path, capsys):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _never_run(nbdir, "01_a", "seed = 0")
    _never_run(nbdir, "02_b", "seed = 0\nsteps = 10")
    args = ["--notebook-dir", str(nbdir), "--output-dir", str(tmp_path / "runs"), "--only", "01"]
    assert run.main(args + ["-p", "steps", "2000"]) == 1
    err = _one_error_line(capsys)
    assert "steps is declared only by 02_b, which --only did not select" in err
    assert run.main(args + ["-p", "stpes", "2000"]) == 1
    assert "unknown parameter(s) stpes: no notebook declares them" in _one_error_line(capsys)
    # a parameters file may hold the parameters of the other notebooks (one file serves any subset)...
    (tmp_path / "all.yaml").write_text("seed: 1\nsteps: 2000\n")
    a, b = nbdir / "01_a.ipynb", nbdir / "02_b.ipynb"
    from_file = run.load_parameters_file(tmp_path / "all.yaml")
    assert run.build_parameters([a], {}, False, known_from=[a, b], from_file=from_file) == {a: {"seed": 1}}
    # ... but not names that no notebook declares
    (tmp_path / "typo.yaml").write_text("stpes: 2000\n")
    assert run.main(args + ["-f", str(tmp_path / "typo.yaml")]) == 1
    assert "unknown parameter(s) stpes in " in _one_error_line(capsys)


def test_the_shipped_parameters_file_fits_every_notebook_and_any_selection():
    notebooks = run.discover()
    from_file = run.load_parameters_file(ROOT / "configs" / "cpu.yaml")
    for only in (None, ["05"]):
        selected = run.select(notebooks, only)
        params = run.build_parameters(selected, {}, False, known_from=notebooks, from_file=from_file)
        assert set(params) == set(selected)


def test_a_bad_parameters_file_or_output_folder_gives_one_error_line(tmp_path, capsys, monkeypatch):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _never_run(nbdir, "01_a", "seed = 0")
    base = ["--notebook-dir", str(nbdir), "--output-dir", str(tmp_path / "runs")]
    files = {"missing.yaml": None, "malformed.yaml": b"seed: [1, 2\nother: {",
             "binary.yaml": bytes(range(256)), "nul.yaml": b"seed: 1\x00\x01", "list.yaml": b"- seed\n- 1\n",
             "folder.yaml": "dir"}
    for name, content in files.items():
        if content == "dir":
            (tmp_path / name).mkdir()
        elif content is not None:
            (tmp_path / name).write_bytes(content)
        assert run.main(base + ["-f", str(tmp_path / name)]) == 1, name
        assert name in _one_error_line(capsys)
    # a relative -f path is taken from the current folder
    monkeypatch.chdir(tmp_path)
    Path("here.yaml").write_text("seed: 2.5\n")
    assert run.main(base + ["-f", "here.yaml"]) == 1
    assert "parameter 'seed' of 01_a (in here.yaml) expects an int" in _one_error_line(capsys)
    # an output folder that cannot be written: a file stands in its way
    (tmp_path / "a-file").write_text("")
    for where in (tmp_path / "a-file", tmp_path / "a-file" / "runs"):
        assert run.main(["--notebook-dir", str(nbdir), "--output-dir", str(where)]) == 1
        assert f"cannot write executed notebooks (--output-dir) to {where}" in _one_error_line(capsys)


def test_help_shows_no_markup_and_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        run.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text
    # each option's entry: its flags, then its help on the same line or indented on the next ones
    entries = re.split(r"\n(?=  -)", text.split("options:")[1].strip("\n"))
    flags = set()
    for entry in entries:
        first, *more = entry.splitlines()
        invocation, _, help_text = first.strip().partition("  ")
        assert (help_text + " ".join(more)).strip(), f"no help for {invocation}"
        flags.update(re.findall(r"--[\w-]+", invocation))
    assert {"--parameter", "--kernel", "--parameters-file", "--output-dir", "--jobs"} <= flags


def test_run_json_records_paths_inside_the_repository_relative_to_it(tmp_path):
    output = ROOT / "runs" / "20260101-000000"
    manifest = run._Manifest(tmp_path / "results", output, ["--fast"])
    assert manifest.invocation["executed_notebooks"] == os.path.join("runs", "20260101-000000")
    outside = run._Manifest(tmp_path / "results", tmp_path / "elsewhere", [])
    assert outside.invocation["executed_notebooks"] == str(tmp_path / "elsewhere")


def test_each_notebook_is_published_as_soon_as_it_finishes(tmp_path):
    # a run that stops early (here: the second notebook fails) has still published the first one, with the
    # provenance of its run.json entry; a machine shut down mid-run loses nothing that had finished
    nbdir, results = tmp_path / "nbs", tmp_path / "results"
    nbdir.mkdir()
    _notebook(nbdir / "01_a.ipynb", 'results_dir = "results"', "print(6 * 7)")
    _notebook(nbdir / "02_bad.ipynb", 'results_dir = "results"', "raise ValueError('broken on purpose')")
    args = ["--notebook-dir", str(nbdir), "-p", "results_dir", str(results),
            "--output-dir", str(tmp_path / "r")]
    assert run.main(args) == 1
    published = json.loads((results / "notebooks" / "01_a.ipynb").read_text())
    entry = json.loads((results / "run.json").read_text())["notebooks"]["01_a"]
    assert published["metadata"]["flowlib"]["provenance"]["started"] == entry["started"]
    printed = ["".join(o.get("text", "")) for c in published["cells"] for o in c.get("outputs", [])]
    assert "42" in "".join(printed)
    assert not (results / "notebooks" / "02_bad.ipynb").exists()
    assert run.main(args + ["--fast"]) == 1  # fast mode publishes nothing: its results are not findings
    assert sorted(p.name for p in (results / "notebooks").iterdir()) == ["01_a.ipynb"]
