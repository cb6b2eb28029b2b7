"""Load configs with mmengine (``_base_``, ``_delete_``, ``{{_base_.x}}``), apply overrides, validate.

``_base_`` entries may name a plugin's config folder as ``"scope::relative/path.py"``; every plugin can
contribute such folders through the ``cambrian_config_dirs`` hook (the built-in configs are
``"cambrian::..."``).
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmengine.config import Config, ConfigDict, DictAction

from cambrian_core.config.schema import Problem, validate_tree

__all__ = [
    "Config",
    "ConfigDict",
    "ConfigError",
    "DictAction",
    "base_files",
    "load_config",
    "parse_cfg_options",
]


class ConfigError(ValueError):
    """A config has problems; ``problems`` lists each one (file, key, message)."""

    def __init__(self, problems: Sequence[Problem], filename: str | None = None) -> None:
        self.problems = list(problems)
        self.filename = filename
        head = f"{len(self.problems)} problem(s) in config {filename}" if filename else "config problems"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


_ORIG_GET_CFG_PATH = Config._get_cfg_path


def _scoped_cfg_path(cfg_path: str, filename: str) -> tuple[str, str | None]:
    """``Config._get_cfg_path`` that also understands plugin-contributed ``scope::path`` bases."""
    if "::" in cfg_path:
        from cambrian_core.plugins import config_dirs

        scope, _, rel = cfg_path.partition("::")
        dirs = config_dirs()
        if scope in dirs:
            path = os.path.join(dirs[scope], rel)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"base config `{cfg_path}` (from {filename}) does not exist: {path}")
            return path, None
        import importlib.util

        if importlib.util.find_spec(scope.split(".")[0]) is None:
            raise ConfigError(
                [
                    Problem(
                        "_base_",
                        f"unknown config scope `{scope}` in `{cfg_path}`; known scopes: {', '.join(sorted(dirs)) or 'none'} "
                        "(install the plugin that provides it; `cambrian config list` shows every scope)",
                        filename,
                    )
                ]
            )
    return _ORIG_GET_CFG_PATH(cfg_path, filename)


@contextlib.contextmanager
def _plugin_scopes() -> Iterator[None]:
    Config._get_cfg_path = staticmethod(_scoped_cfg_path)  # type: ignore[method-assign]
    try:
        yield
    finally:
        Config._get_cfg_path = staticmethod(_ORIG_GET_CFG_PATH)  # type: ignore[method-assign]


#: spellings from YAML / JSON / shell habits, read as mmengine's DictAction reads them
_WORDS = {"true": True, "false": False, "none": None, "null": None}


def _literal(text: str) -> Any:
    """A ``--cfg-options`` value: a Python literal, ``true`` / ``false`` / ``none`` / ``null`` in any case, or
    else the text itself (a bare word such as ``sdpa``)."""
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_cfg_options(options: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]", "d=false"]`` -> ``{"a.b": 1, "c": [1, 2], "d": False}`` (values parsed as Python
    literals; true / false / none / null in any case as the bool or None)."""
    if not options:
        return {}
    if isinstance(options, Mapping):
        return dict(options)
    out = {}
    for item in options:
        if "=" not in item:
            raise ConfigError([Problem(item, "a --cfg-options item must look like key.path=value")])
        key, _, value = item.partition("=")
        out[key.strip()] = _literal(value.strip())
    return out


def base_files(filename: str | os.PathLike) -> list[str]:
    """The config file and every file it inherits from, leaf first (used to attribute problems)."""
    seen, order, stack = set(), [], [os.path.abspath(filename)]
    with _plugin_scopes():
        while stack:
            f = stack.pop(0)
            if f in seen or not os.path.isfile(f):
                continue
            seen.add(f)
            order.append(f)
            try:
                for b in Config._get_base_files(f):
                    stack.append(os.path.abspath(Config._get_cfg_path(b, f)[0]))
            except Exception:  # the load itself reports unreadable bases
                continue
    return order


def _attribute(problem: Problem, files: list[str]) -> Problem:
    """Find the file that sets the problem's last key (leaf config first)."""
    leaf_key = re.sub(r"\[\d+\]", "", problem.key).split(".")[-1]
    if leaf_key == "type":
        leaf_key = re.sub(r"\[\d+\]", "", problem.key).split(".")[-2] if "." in problem.key else leaf_key
    pattern = re.compile(rf"(\b{re.escape(leaf_key)}\s*=(?!=)|['\"]{re.escape(leaf_key)}['\"]\s*:)")
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except OSError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                return Problem(problem.key, problem.message, f"{f}:{lineno}")
    return Problem(problem.key, problem.message, files[0] if files else None)


def _unreadable(filename: str, message: str, where: str | None = None) -> ConfigError:
    return ConfigError([Problem("", message, where or filename)], filename)


def _syntax_culprit(filename: str, exc: SyntaxError) -> str:
    """The file a nameless ``SyntaxError`` came from: mmengine parses ``_base_`` files without naming them, so
    the first of the config and its (local) bases that does not parse, else ``filename``."""
    import ast

    todo, seen = [Path(filename)], set()
    while todo:
        path = todo.pop(0)
        if path in seen or path.suffix != ".py" or not path.is_file():
            continue
        seen.add(path)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        except SyntaxError as err:
            if (err.msg, err.lineno) == (exc.msg, exc.lineno):
                return str(path)
            continue
        for node in tree.body:  # _base_ = "x.py" or ["x.py", ...], relative to this file
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_base_" for t in node.targets):
                try:
                    bases = ast.literal_eval(node.value)
                except ValueError:
                    continue
                for base in [bases] if isinstance(bases, str) else list(bases):
                    if isinstance(base, str) and "::" not in base:
                        todo.append((path.parent / base).resolve())
    return filename


def _read(filename: str) -> Config:
    """``Config.fromfile`` with every way a config file (or one of its ``_base_`` files) can be unreadable turned into
    a :class:`ConfigError` naming the file (and line) instead of a traceback."""
    if Path(filename).suffix not in (".py", ".json", ".yaml", ".yml"):
        raise _unreadable(filename, "not a config file; use a .py (or .json / .yaml) config")
    try:
        with _plugin_scopes():
            return Config.fromfile(filename)
    except ConfigError:
        raise
    except SyntaxError as exc:
        where = (
            exc.filename if exc.filename and exc.filename != "<unknown>" else _syntax_culprit(filename, exc)
        )
        raise _unreadable(filename, f"Python syntax error: {exc.msg}", f"{where}:{exc.lineno}") from None
    except FileNotFoundError as exc:
        missing = exc.filename or str(exc)
        raise _unreadable(
            filename,
            f"a `_base_` file does not exist: {missing} (paths are relative to the file that names them; "
            "plugin configs are written `scope::path`)",
        ) from None
    except Exception as exc:  # JSON / YAML parse errors, exceptions raised by the config's own code
        detail = " ".join(str(exc).split())
        raise _unreadable(
            filename, f"cannot be read (it or one of its `_base_` files): {type(exc).__name__}: {detail}"
        ) from None


def load_config(
    filename: str | os.PathLike,
    cfg_options: Sequence[str] | Mapping[str, Any] | None = None,
    validate: bool = True,
) -> Config:
    """Load ``filename`` with its bases, merge ``cfg_options`` and check it against the schemas.

    Raises:
        FileNotFoundError: the config file does not exist.
        ConfigError: listing every problem, each with the file (and line) that sets the key and a suggestion.
    """
    filename = os.fspath(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"config file not found: {filename}")
    cfg = _read(filename)
    overrides = parse_cfg_options(cfg_options)
    if overrides:
        cfg.merge_from_dict(overrides)
    if validate:
        check(cfg, filename, overrides)
    return cfg


def _dotted(key: str) -> str:
    """``a.b[0].c`` (a problem's key) and ``a.b.0.c`` (a ``--cfg-options`` key) in one spelling."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def check(
    cfg: Config | Mapping[str, Any], filename: str | None = None, overrides: Mapping[str, Any] = ()
) -> None:
    """Validate a resolved config; raise ``ConfigError`` with every problem at once."""
    tree = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    problems = validate_tree(tree)
    if not problems:
        return
    files = base_files(filename) if filename else []
    attributed = []
    changed = [_dotted(k) for k in overrides]
    for p in problems:
        key = _dotted(p.key)
        below = [k for k in changed if key and k.startswith(key + ".")]
        if any(key == k or key.startswith(k + ".") for k in changed):
            attributed.append(Problem(p.key, p.message, "--cfg-options"))
        elif below:  # a whole-part problem (a cross-check) in a part that --cfg-options changed
            found = _attribute(p, files) if files else p
            where = f"{found.file} with " if found.file else ""
            attributed.append(Problem(p.key, p.message, f"{where}--cfg-options {', '.join(below)}"))
        else:
            attributed.append(_attribute(p, files) if files else p)
    raise ConfigError(attributed, filename)
