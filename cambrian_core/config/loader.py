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
from collections.abc import Collection, Iterator, Mapping, Sequence
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


def _scope_path(cfg_path: str, key: str, filename: str | None) -> str | None:
    """The file a plugin-contributed ``scope::rel`` names (``None``: a scope mmengine itself loads, such as
    ``mmdet::``); an unknown scope is a :class:`ConfigError` listing the known ones."""
    from mmengine.config.utils import PKG2PROJECT

    from cambrian_core.plugins import config_dirs

    scope, _, rel = cfg_path.partition("::")
    dirs = config_dirs()
    if scope in dirs:
        return os.path.join(dirs[scope], rel)
    if scope in PKG2PROJECT:
        return None
    known = ", ".join(sorted(dirs)) or "none"
    raise ConfigError(
        [
            Problem(
                key,
                f"unknown config scope `{scope}` in `{cfg_path}`; known scopes: {known} "
                "(install the plugin that provides it; `cambrian config list` shows every scope)",
                filename,
            )
        ]
    )


def _scoped_cfg_path(cfg_path: str, filename: str) -> tuple[str, str | None]:
    """``Config._get_cfg_path`` that also understands plugin-contributed ``scope::path`` bases."""
    if "::" in cfg_path:
        path = _scope_path(cfg_path, "_base_", filename)
        if path is not None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"base config `{cfg_path}` (from {filename}) does not exist: {path}")
            return path, None
    return _ORIG_GET_CFG_PATH(cfg_path, filename)


def _config_file(filename: str) -> str:
    """``filename``, or the file a ``scope::rel`` name (as ``cambrian config list`` prints it) stands for."""
    if "::" in filename and not os.path.isfile(filename):
        return _scope_path(filename, "", None) or filename
    return filename


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
    """A ``--cfg-options`` value: a Python literal, ``true`` / ``false`` / ``none`` / ``null`` in any case, an
    unquoted list or tuple as mmengine's DictAction reads it (``[a.jsonl,b.jsonl]``, ``a,b``), or else the text
    itself (a bare word such as ``sdpa``)."""
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if text[:1] in "[(" or "," in text:  # DictAction's unquoted iterables: [a.jsonl,b.jsonl], a,b, (a,b)
        with contextlib.suppress(AssertionError):  # unbalanced brackets
            return DictAction._parse_iterable(text)
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
    seen, order, stack = set(), [], [os.path.abspath(_config_file(os.fspath(filename)))]
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


#: ``{{_base_.x.y}}`` (read as the expression ``_base_.x.y``) and other ``{{...}}`` (read as ``None``)
_BASE_REF = re.compile(r"\{\{\s*(_base_(?:\.\w+)+)\s*\}\}")
_OTHER_REF = re.compile(r"\{\{[^{}\n]*\}\}")


def _assignments(filename: str) -> dict[str, ast.stmt]:
    """Top-level ``name = ...`` statements of a Python config (the last one per name), ``{}`` if unparsable."""
    try:
        text = Path(filename).read_text(encoding="utf-8")
        tree = ast.parse(_OTHER_REF.sub("None", _BASE_REF.sub(r"\1", text)))
    except (OSError, SyntaxError, ValueError):
        return {}
    out: dict[str, ast.stmt] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for t in targets:
            if isinstance(t, ast.Name) and getattr(node, "value", None) is not None:
                out[t.id] = node
    return out


def _base_ref(node: ast.expr) -> list[str] | None:
    """``["x", "y"]`` for the expression ``_base_.x.y`` (a ``{{_base_.x.y}}``), else ``None``."""
    names: list[str] = []
    while isinstance(node, ast.Attribute):
        names.insert(0, node.attr)
        node = node.value
    return names if names and isinstance(node, ast.Name) and node.id == "_base_" else None


def _child(node: ast.expr, part: str) -> tuple[ast.expr, int] | None:
    """The value (and its line) of keyword / entry / item ``part`` of a ``dict(...)``, ``{...}`` or ``[...]``."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
        kw = next((kw for kw in node.keywords if kw.arg == part), None)
        return (kw.value, kw.lineno) if kw else None
    if isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values, strict=True):
            if isinstance(k, ast.Constant) and str(k.value) == part:
                return v, k.lineno
    if isinstance(node, (ast.List, ast.Tuple)) and part.isdigit() and int(part) < len(node.elts):
        return node.elts[int(part)], node.elts[int(part)].lineno
    return None


def _locate(parts: Sequence[str], files: Sequence[str], depth: int = 0) -> str | None:
    """``file:line`` of the first file (leaf first) that sets the dotted key ``parts`` itself, following
    ``{{_base_.x}}`` into the bases; ``None`` if no file does."""
    for i, f in enumerate(files):
        stmt = _assignments(f).get(parts[0])
        if stmt is None:
            continue
        value, line = stmt.value, stmt.lineno  # type: ignore[attr-defined]
        for j, part in enumerate(parts[1:], 1):
            ref = _base_ref(value)
            if ref is not None:  # the rest of the key is in a base
                found = _locate([*ref, *parts[j:]], files[i + 1 :], depth + 1) if depth < 8 else None
                if found:
                    return found
                line = None
                break
            step = _child(value, part)
            if step is None:
                line = None
                break
            value, line = step
        if line is not None:
            return f"{f}:{line}"
    return None


def _attribute(problem: Problem, files: list[str]) -> Problem:
    """Find the file (and line) that sets the problem's key: the dotted path walked through each file's
    ``dict(...)`` / ``[...]`` values (leaf first), else the first line that sets its last key."""
    found = _locate(_dotted(problem.key).split("."), files) if problem.key else None
    if found:
        return Problem(problem.key, problem.message, found)
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
    filename = _config_file(os.fspath(filename))
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"config file not found: {filename}")
    cfg = _read(filename)
    overrides = parse_cfg_options(cfg_options)
    new_keys = {k.split(".")[0] for k in overrides} - set(cfg.keys())
    problems = []
    for key, value in overrides.items():
        try:
            object.__setattr__(cfg, "_cfg_dict", _override(cfg._cfg_dict, key.split("."), value))
        except _BadKey as exc:
            problems.append(Problem(key, str(exc), "--cfg-options"))
    if problems:
        raise ConfigError(problems, filename)
    if validate:
        check(cfg, filename, overrides, new_keys)
    return cfg


class _BadKey(ValueError):
    """A ``--cfg-options`` key that does not fit the config's shape (the message says why)."""


def _override(node: Any, parts: Sequence[str], value: Any, done: str = "") -> Any:
    """``node`` with the dotted key ``parts`` set to ``value``, as mmengine's ``merge_from_dict`` sets it (a dict
    value merges into a dict, digits index lists) but copied along the path, so values a ``{{_base_.x}}``
    shares stay as they are, with ``None`` on the way replaced by a dict (``lora.r=8`` on ``lora = None``), and
    a key that cannot be set a :class:`_BadKey` instead of a ``TypeError`` / ``KeyError``."""
    if not parts:
        if isinstance(value, Mapping) and isinstance(node, (Mapping, list)):
            try:
                return Config._merge_a_into_b(dict(value), node, allow_list_keys=True)
            except (TypeError, KeyError, AttributeError) as exc:
                raise _BadKey(f"cannot be merged into `{done}` ({' '.join(str(exc).split())})") from None
        return ConfigDict(value) if isinstance(value, Mapping) else value
    part, rest, here = parts[0], parts[1:], f"{done}.{parts[0]}" if done else parts[0]
    if isinstance(node, list):
        if not part.isdigit():
            raise _BadKey(f"`{done}` is a list: name an item by its index, e.g. `{done}.0`")
        if int(part) >= len(node):
            raise _BadKey(
                f"`{done}` has {len(node)} item(s) (indexes 0..{len(node) - 1}), so there is no item {part}"
            )
        out = list(node)
        out[int(part)] = _override(node[int(part)], rest, value, here)
        return out
    if node is None:
        node = ConfigDict()
    if not isinstance(node, Mapping):
        raise _BadKey(
            f"`{done}` is {node!r} ({type(node).__name__}), not a dict, so it has no key `{part}`; "
            f"set `{done}` itself"
        )
    out = ConfigDict(node) if not isinstance(node, ConfigDict) else node.copy()
    out[part] = _override(node.get(part), rest, value, here)
    return out


def _dotted(key: str) -> str:
    """``a.b[0].c`` (a problem's key) and ``a.b.0.c`` (a ``--cfg-options`` key) in one spelling."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def check(
    cfg: Config | Mapping[str, Any],
    filename: str | None = None,
    overrides: Mapping[str, Any] = (),
    new_keys: Collection[str] = (),
) -> None:
    """Validate a resolved config; raise ``ConfigError`` with every problem at once.

    ``new_keys``: top-level keys that only ``overrides`` set (their problems are the overrides' alone).
    """
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
        if any(key == k or key.startswith(k + ".") for k in changed) or key.split(".")[0] in new_keys:
            attributed.append(Problem(p.key, p.message, "--cfg-options"))
        elif below:  # a whole-part problem (a cross-check) in a part that --cfg-options changed
            found = _attribute(p, files) if files else p
            where = f"{found.file} with " if found.file else ""
            attributed.append(Problem(p.key, p.message, f"{where}--cfg-options {', '.join(below)}"))
        else:
            attributed.append(_attribute(p, files) if files else p)
    raise ConfigError(attributed, filename)
