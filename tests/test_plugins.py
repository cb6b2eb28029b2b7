"""Plugin discovery: entry points, providers, broken plugins, --strict, plugin config folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "cambrian_core.cli"]


def _fake_dist(root: Path, name: str, module: str, source: str, ep_name: str) -> None:
    """A minimal installed distribution on ``root`` (dist-info + entry point), no pip needed."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[cambrian.plugins]\n{ep_name} = {module}\n")


def _run(args: list[str], extra_path: Path | None = None, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_vars}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=120)


def test_fresh_interpreter_discovers_builtins_with_provider() -> None:
    import importlib.metadata as md

    out = _run(["plugins", "list", "--json"])
    assert out.returncode == 0, out.stderr
    table = json.loads(out.stdout)["components"]
    # a plugin author runs this suite with their package installed: its rows are theirs
    others = {ep.dist.metadata["Name"] for ep in md.entry_points(group="cambrian.plugins")} - {"cambrian"}
    for kind in ("encoders", "connectors", "llms", "models", "templates", "datasets"):
        assert table[kind], f"no built-in {kind} discovered"
        mine = [row for row in table[kind] if row["provider"].startswith("cambrian ")]
        assert mine and (others or len(mine) == len(table[kind])), table[kind]


def test_broken_plugin_is_reported_and_others_still_load(tmp_path: Path) -> None:
    _fake_dist(
        tmp_path, "brokenplug", "brokenplug_mod", "raise RuntimeError('boom at import')\n", "brokenplug"
    )
    out = _run(["plugins", "list"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (
        "FAILED  plugin `brokenplug` from brokenplug 0.3 failed: RuntimeError: boom at import" in out.stdout
    )
    assert "encoders (" in out.stdout and "cambrian 0.1.0" in out.stdout

    strict = _run(["--strict", "plugins", "list"], tmp_path)
    assert strict.returncode == 2
    assert "brokenplug" in strict.stderr and "boom at import" in strict.stderr
    # $CAMBRIAN_STRICT_PLUGINS is the default when --strict is not given
    env_strict = _run(["plugins", "list"], tmp_path, CAMBRIAN_STRICT_PLUGINS="1")
    assert env_strict.returncode == 2 and "boom at import" in env_strict.stderr
    assert _run(["plugins", "list"], tmp_path, CAMBRIAN_STRICT_PLUGINS="0").returncode == 0


def test_a_plugin_cannot_take_builtin_names_or_break_the_command_line(tmp_path: Path) -> None:
    """Third-party packages whose names sort before ``cambrian``: one uses the entry-point name ``encoders``,
    one registers a connector named ``sva`` between two of its own, one has hooks that fail. The built-ins all
    stay, each clash and failing hook is reported naming both sides, and every command still works."""
    enc = """
    from cambrian_core import hookimpl

    class AaEncoder:
        pass

    @hookimpl
    def cambrian_register(registries):
        registries.encoders.register_module(name="aa_enc", module=AaEncoder)
    """
    conn = """
    from cambrian_core import hookimpl

    class A: pass
    class B: pass
    class C: pass

    @hookimpl
    def cambrian_register(registries):
        registries.connectors.register_module(name="aa_first", module=A)
        registries.connectors.register_module(name="sva", module=B)
        registries.connectors.register_module(name="aa_after", module=C)
    """
    hooks = """
    from cambrian_core import hookimpl

    @hookimpl
    def cambrian_cli_commands(subparsers):
        subparsers.add_parser("config")  # taken by cambrian

    @hookimpl
    def cambrian_config_dirs():
        raise RuntimeError("config_dirs hook bug")
    """
    _fake_dist(tmp_path, "aaep", "aaep_mod", enc, "encoders")
    _fake_dist(tmp_path, "aaplug", "aaplug_mod", conn, "aaplug")
    _fake_dist(tmp_path, "aahooks", "aahooks_mod", hooks, "aahooks")
    out = _run(["plugins", "list", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    providers = {kind: {r["name"]: r["provider"] for r in rows} for kind, rows in data["components"].items()}
    assert providers["encoders"]["aa_enc"] == "aaep 0.3" and providers["encoders"]["siglip"].startswith(
        "cambrian "
    )
    conns = providers["connectors"]
    assert conns["sva"].startswith("cambrian ") and conns["identity"].startswith("cambrian ")
    assert conns["aa_first"] == conns["aa_after"] == "aaplug 0.3"
    failures = "\n".join(data["failures"])
    assert (
        "plugin aaplug 0.3 failed: connector `sva` clashes with the one from cambrian 0.1.0, which is kept"
        in failures
    )
    assert "aahooks 0.3 failed: cambrian_cli_commands: ArgumentError" in failures
    shown = _run(["config", "list"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "cambrian_config_dirs: RuntimeError: config_dirs hook bug" in shown.stderr
    assert _run(["--strict", "plugins", "list"], tmp_path).returncode == 2


def test_plugin_registration_error_is_isolated(tmp_path: Path) -> None:
    src = """
    from cambrian_core import hookimpl

    @hookimpl
    def cambrian_register(registries):
        raise ValueError("bad registration")
    """
    _fake_dist(tmp_path, "badreg", "badreg_mod", src, "badreg")
    out = _run(["plugins", "list", "--json"], tmp_path)
    data = json.loads(out.stdout)
    assert any("badreg" in f and "bad registration" in f for f in data["failures"])
    assert data["components"]["encoders"]


def test_third_party_component_and_config_dir(tmp_path: Path) -> None:
    cfg_dir = tmp_path / "thirdcfg"
    (cfg_dir / "_base_").mkdir(parents=True)
    (cfg_dir / "_base_" / "seed.py").write_text("seed = 1234\n")
    src = f"""
    from cambrian_core import hookimpl

    class Thing:
        def __init__(self, size: int = 2):
            self.size = size

    @hookimpl
    def cambrian_register(registries):
        registries.metrics.register_module(name="third_thing", module=Thing)

    @hookimpl
    def cambrian_config_dirs():
        return {{"thirdparty": {str(cfg_dir)!r}}}

    def _count(args):
        print("registered metrics:", args.prefix, len(args.prefix) * 2)
        return 3 if args.prefix == "fail" else 0

    @hookimpl
    def cambrian_cli_commands(subparsers):
        cmd = subparsers.add_parser("third-count", help="a command from a plugin")
        cmd.add_argument("prefix")
        cmd.set_defaults(func=_count)
    """
    _fake_dist(tmp_path, "thirdparty", "thirdparty_mod", src, "thirdparty")
    out = _run(["plugins", "list", "--kind", "metrics"], tmp_path)
    assert "third_thing" in out.stdout and "thirdparty 0.3" in out.stdout
    user_cfg = tmp_path / "user.py"
    user_cfg.write_text("_base_ = ['thirdparty::_base_/seed.py']\nwork_dir = 'w'\n")
    show = _run(["config", "show", str(user_cfg)], tmp_path)
    assert show.returncode == 0, show.stderr
    assert "seed = 1234" in show.stdout
    # the plugin's subcommand: listed in --help, dispatched with its arguments, its exit status kept
    assert "third-count" in _run(["--help"], tmp_path).stdout
    ran = _run(["third-count", "abc"], tmp_path)
    assert ran.returncode == 0 and "registered metrics: abc 6" in ran.stdout, ran.stderr
    assert _run(["third-count", "fail"], tmp_path).returncode == 3


def test_help_lists_only_working_subcommands() -> None:
    out = _run(["--help"])
    assert out.returncode == 0
    for cmd in ("plugins", "config"):
        assert cmd in out.stdout
    # every advertised subcommand answers --help without error
    import re

    listed = re.findall(r"^    ([a-z][a-z\-]+)\s{2,}\S", out.stdout, flags=re.M)
    assert {"plugins", "config"} <= set(listed), out.stdout
    for cmd in listed:
        sub = _run([cmd, "--help"])
        assert sub.returncode == 0, f"`cambrian {cmd} --help` failed: {sub.stderr}"


@pytest.mark.parametrize("entry", ["cambrian", "cambrian-train"])
def test_console_scripts_installed(entry: str) -> None:
    exe = Path(sys.executable).with_name(entry)
    assert exe.exists(), f"console script {entry} missing; reinstall with pip install -e ."


def test_a_second_thread_waits_for_discovery_instead_of_seeing_empty_registries() -> None:
    script = textwrap.dedent(
        """
        import threading, time
        from cambrian_core import plugins
        from cambrian_core.registry import ENCODERS, LLMS

        res = {}
        def first():
            res["a"] = LLMS.get("llama3") is not None  # starts discovery
        def second():
            while not plugins._state["loading"]:  # discovery has begun in the other thread
                time.sleep(0.0005)
            try:
                res["b"] = ENCODERS.lookup("siglip").__name__
            except Exception as exc:
                res["b"] = f"{type(exc).__name__}: {exc}"
        tb = threading.Thread(target=second)
        tb.start()
        ta = threading.Thread(target=first)
        ta.start()
        ta.join()
        tb.join()
        print(res["a"], res["b"])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "SiglipEncoder"]


def test_reload_registers_again_what_a_plugin_registers_on_import(tmp_path: Path) -> None:
    src = """
    from cambrian_core.registry import CONNECTORS

    class MyConn:
        pass

    CONNECTORS.register_module(name="my_conn", module=MyConn)
    """
    _fake_dist(tmp_path, "impplug", "impplug_mod", src, "impplug")
    script = textwrap.dedent(
        """
        from cambrian_core import plugins
        from cambrian_core.registry import CONNECTORS

        sva = CONNECTORS.get("sva")
        plugins.load_plugins(reload=True)
        print("my_conn" in CONNECTORS, CONNECTORS.providers.get("my_conn"), CONNECTORS.get("sva") is sva)
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the plugin's import-time component is back (same provider); the built-ins are the same classes
    assert proc.stdout.split() == ["True", "impplug", "0.3", "True"]
