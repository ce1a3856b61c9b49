"""The notebooks' parameters as the runner (:mod:`flowlib.run`) checks them: what each notebook declares
in its ``parameters`` cell, values read from ``-p`` and ``-f``, and the check of every value against the type
of the declared default, before anything runs (papermill itself would only warn)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import yaml

# What --fast sets in every notebook that declares these parameters.
FAST_PARAMETERS = {"fast": True, "results_dir": "results/fast", "checkpoint_dir": "checkpoints/fast"}

class RunnerError(RuntimeError):
    """A problem with the request (unknown notebook or parameter), reported before running anything."""


def declared_parameters(path: Path) -> dict:
    """The notebook's parameters cell, as papermill reads it (cached: the runner asks several times)."""
    return _inspect(str(path), Path(path).stat().st_mtime_ns)


@functools.cache
def _inspect(path: str, mtime_ns: int) -> dict:
    import papermill

    return papermill.inspect_notebook(path)


def parse_value(text: str):
    """``-p`` values are read as YAML: 3 -> int, 0.5 -> float, true -> bool, [a, b] -> list, else string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_parameters_file(path: str | Path) -> dict:
    """The mapping of parameter names to values in the YAML file ``path`` (relative to the current folder);
    :class:`RunnerError`, with a one-line reason, if it cannot be read or is not such a mapping."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RunnerError(f"parameters file {path} is not a text (UTF-8) file") from None
    except OSError as err:
        raise RunnerError(f"cannot read parameters file {path}: {err.strerror or err}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err)
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RunnerError(" ".join(f"parameters file {path} is not valid YAML: {problem}{where}".split())) \
            from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise RunnerError(f"parameters file {path} must hold a mapping of parameter names to values, "
                          f"not a {_type_name(loaded)}")
    odd = [k for k in loaded if not isinstance(k, str)]
    if odd:
        raise RunnerError(f"parameters file {path}: parameter names must be text, got {odd[0]!r}")
    return loaded


_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping"}


def _type_name(value) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)


def _fits(value, default) -> bool:
    """Whether ``value`` has the type of a notebook's ``default``: an int default takes an int (not a
    bool), a float default an int or a float, a bool only a bool, a str only a str, a mapping a mapping, a
    list a list whose elements each fit one of the default's elements (any list if the default is empty).
    A None default, or one of another type, takes anything."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple)) and (
            not default or all(any(_fits(v, d) for d in default) for v in value))
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def _as_default_type(value, default):
    """``value`` (which fits ``default``) with ints made floats where the default is a float: the same
    configuration then reads (and hashes, for checkpoints) the same however it was written."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and default and all(isinstance(d, float) for d in default):
        return [_as_default_type(v, default[0]) for v in value]
    return value


def _expected(default) -> str:
    """What a parameter with this default takes, in words: "an int", "a list of str"..."""
    if isinstance(default, (list, tuple)):
        kinds = {_type_name(d) for d in default}
        return "a list" + (f" of {kinds.pop()}" if len(kinds) == 1 else "")
    name = _type_name(default)
    return f"{'an' if name == 'int' else 'a'} {name}"


def check_value(notebook: str, name: str, spec: dict, value, text: str | None = None,
                source: str | None = None):
    """``value`` for parameter ``name`` of ``notebook``, whose declaration papermill read as ``spec``, checked
    against the type of the declared default (:func:`_fits`); :class:`RunnerError` naming the parameter if it
    does not fit. ``text`` is the value as typed after ``-p``: a str parameter takes it as it is
    (``-p results_dir 2024``), and a list parameter given one element is told how to write the list.
    ``source`` names where a value that did not come from ``-p`` came from (a parameters file)."""
    try:
        default = ast.literal_eval(spec.get("default", "None"))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return value  # not a literal: nothing to compare with
    if isinstance(default, str) and text is not None and not isinstance(value, str):
        return text
    if _fits(value, default):
        return _as_default_type(value, default)
    got = "null" if value is None else f"the {_type_name(value)} {value!r}"
    where = "" if text is not None or source is None else f" (in {source})"
    message = (f"parameter {name!r} of {notebook}{where} expects {_expected(default)} such as "
               f"{spec['default']}, got {got}")
    if isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)) and text is not None:
        message += f"; write -p {name} '[{text}]'"
    raise RunnerError(message)


def build_parameters(notebooks: list[Path], cli: dict, fast: bool, known_from: list[Path] | None = None,
                     from_file: dict | None = None, file_name: str = "the parameters file",
                     cli_text: dict[str, str] | None = None) -> dict[Path, dict]:
    """Per-notebook parameters, checked before anything runs; :class:`RunnerError` if a check fails.

    ``cli`` holds the values given on the command line: each name must be declared by one of ``notebooks``
    (the selected ones). ``from_file`` holds the values of a parameters file (``file_name``): each name must
    be declared by some notebook of ``known_from`` (default: ``notebooks``), so that one file serves the whole
    folder and any part of it; command-line values win over the file's. Every value must fit the type of the
    default its notebook declares (:func:`check_value`); ``cli_text`` is each command-line value as typed.
    """
    declared = {p: declared_parameters(p) for p in notebooks}
    selected = set().union(*[set(d) for d in declared.values()])
    from_file, cli_text = from_file or {}, cli_text or {}
    if from_file:
        reference = declared if known_from is None else {p: declared_parameters(p) for p in known_from}
        known = set().union(*[set(d) for d in reference.values()])
        unknown = sorted(set(from_file) - known)
        if unknown:
            raise RunnerError(f"unknown parameter(s) {', '.join(unknown)} in {file_name}: no notebook "
                              f"declares them. Declared parameters: {', '.join(sorted(known))}")
    unknown = sorted(set(cli) - selected)
    if unknown:
        elsewhere = {name: [p.stem for p in known_from or [] if name in declared_parameters(p)]
                     for name in unknown}
        nowhere = [name for name in unknown if not elsewhere[name]]
        problems = []
        if nowhere:
            problems.append(f"unknown parameter(s) {', '.join(nowhere)}: no notebook declares them.")
        for name in unknown:
            if elsewhere[name]:
                problems.append(f"parameter {name} is declared only by {', '.join(elsewhere[name])}, which "
                                f"--only did not select.")
        raise RunnerError(" ".join(problems) + f" Declared parameters: {', '.join(sorted(selected))}")
    per_notebook = {}
    for path, names in declared.items():
        params = {k: v for k, v in FAST_PARAMETERS.items() if fast and k in names}
        for name, value in from_file.items():
            if name in names and name not in cli:  # a -p value replaces the file's
                params[name] = check_value(path.stem, name, names[name], value, source=file_name)
        for name, value in cli.items():
            if name in names:
                params[name] = check_value(path.stem, name, names[name], value, text=cli_text.get(name))
        per_notebook[path] = params
    return per_notebook
