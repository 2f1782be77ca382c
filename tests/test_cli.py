"""The `revnets` command as a user's shell sees it."""
import argparse
import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from revnets.cli import import_modules, main

ROOT = Path(__file__).resolve().parents[1]


def test_output_into_a_closed_pipe_ends_quietly(monkeypatch):
    """`revnets models | head -n 1`: head exits, the next write fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w", buffering=1) as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main(["models"]) == 1


def test_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "revnets.cli", "--help"], capture_output=True, text=True)
    for command in ("train", "eval", "predict", "models", "plot", "analyze", "reproduce"):
        assert command in done.stdout


@pytest.mark.parametrize("argv", [["train", "--schedule", "bogus"], ["train", "--bogus"], ["analyze"], ["frobnicate"]])
def test_a_usage_error_is_one_line_and_exit_code_2(argv, capsys):
    with pytest.raises(SystemExit) as end:
        main(argv)
    err = capsys.readouterr().err
    assert end.value.code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err


@pytest.mark.parametrize("text, ok", [("3", True), ("0", False), ("-2", False), ("x", False)])
def test_positive_int_accepts_counts_only(text, ok):
    from revnets.cli import positive_int
    if ok:
        assert positive_int(text) == int(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            positive_int(text)


def test_import_registers_a_users_schemes_and_models_before_the_command():
    """`revnets --import user_scheme models` in a fresh process (the module in the current directory):
    its models are listed, with "-" where the paper gives no count."""
    done = subprocess.run([sys.executable, "-m", "revnets.cli", "--import", "user_scheme", "models", "--num-classes",
                           "10"], capture_output=True, text=True, cwd=ROOT / "tests",
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("user-tanh-6 "))
    assert row.split()[1:6] == ["image", "user-tanh", "2-2-2", "/", "8-16-16"] and row.split()[-1] == "-"


def test_imported_models_are_valid_names_for_the_commands(tmp_path, capsys):
    argv = ["--import", "user_scheme", "train", "--model", "user-tanh-6", "--grow-at", "1", "--epochs", "2",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "--grow-at halves the step size h, which user-tanh-6 does not have" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_import_of_a_missing_module_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as end:
        main(["--import", "no_such_module_xyz", "models"])
    assert end.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "revnets: error: --import no_such_module_xyz: ModuleNotFoundError: No module named 'no_such_module_xyz'"]


def test_an_imported_module_that_exits_is_an_error(tmp_path, monkeypatch, capsys):
    """sys.exit(0) in a user's module would end revnets with nothing done and exit code 0."""
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "exits_at_import", raising=False)
    with pytest.raises(SystemExit) as end:
        main(["--import", "exits_at_import", "models"])
    assert end.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "revnets: error: --import exits_at_import: the module exited (sys.exit(0)) while being imported"]


def test_the_current_directory_is_on_the_path_only_while_importing(tmp_path, monkeypatch):
    """A stray module in the current directory (a file named like a library, e.g. sklearn.py) is not
    imported in the library's place once the user's modules are imported."""
    (tmp_path / "user_module_here.py").write_text("import os, sys\nSEEN = os.getcwd() in sys.path\n")
    (tmp_path / "stray_module_here.py").write_text("raise AssertionError('a stray module ran')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "user_module_here", raising=False)
    import_modules(["--import", "user_module_here", "models"])
    assert sys.modules["user_module_here"].SEEN and str(tmp_path) not in sys.path
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("stray_module_here")


@pytest.mark.parametrize("command", [["train", "--dataset", "digits", "--model", "hamiltonian-74", "--epochs", "1"],
                                     ["analyze", "--model", "hamiltonian-74"]])
def test_an_out_below_a_file_says_so(command, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main([*command, "--out", str(tmp_path / "afile" / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {tmp_path}/afile/sub: {tmp_path}/afile is a file, not a directory" in err


@pytest.mark.parametrize("command", [["train", "--dataset", "digits"], ["analyze"]])
def test_an_unregistered_model_name_mentions_import(command, tmp_path, capsys):
    assert main([*command, "--model", "nosuch-20", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'nosuch-20'" in err and "revnets --import MODULE" in err
    assert not (tmp_path / "run").exists()


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its __init__.py)."""
    found = {}
    for path in sorted((ROOT / "revnets").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, str]]:
    """(imported module, imported name or "") of every import statement in the module, those inside
    functions included, with relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(p for p in (base, node.module) if p)
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.append((child, "") if child in modules else (source, alias.name))
    return [(m, n) for m, n in found if m == "revnets" or m.startswith("revnets.")]


def _layer(name: str) -> str:
    return "cli" if name.startswith("revnets.cli") else "training" if name.startswith("revnets.training") else "core"


def test_layers_import_downwards_only_and_never_anothers_private_names():
    """The core (blocks, engine, networks, models, ...) imports nothing from training or cli; training
    imports nothing from cli; no module imports another module's underscore names. Every import
    counts, at the top of a file or inside a function."""
    modules = _modules()
    below = {"core": {"core"}, "training": {"core", "training"}, "cli": {"core", "training", "cli"}}
    wrong, private = [], []
    for name, path in modules.items():
        for target, what in _imports(name, path, modules):
            if _layer(target) not in below[_layer(name)]:
                wrong.append(f"{name} imports {target}")
            if what.startswith("_") and what != "__version__" and target != name:
                private.append(f"{name} imports {target}.{what}")
    assert len(modules) > 30 and not wrong and not private, wrong + private


def test_no_import_circles():
    modules = _modules()
    graph = {name: {t for t, _ in _imports(name, path, modules) if t != name} for name, path in modules.items()}
    done, path = set(), []

    def visit(name):
        assert name not in path, " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        path.append(name)
        for target in graph.get(name, ()):
            visit(target)
        path.pop()
        done.add(name)
    for name in graph:
        visit(name)


def test_import_revnets_loads_no_training_command_or_argparse_module():
    """`import revnets` loads the library core only. (torch itself imports argparse, so the check is
    that no revnets module loaded uses it.)"""
    code = ("import sys, revnets; print([m for m in sys.modules if m.startswith(('revnets.training', "
            "'revnets.cli'))]); print([m.__name__ for n, m in list(sys.modules.items()) if n.startswith('revnets') "
            "and 'import argparse' in open(m.__file__).read()])")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.split("\n")[:2] == ["[]", "[]"], done.stdout


@pytest.mark.parametrize("script", ["defaults.py", "drift.py"])
def test_benchmarks_train_through_the_library_step(script):
    source = (ROOT / "benchmarks" / script).read_text()
    assert "train_step(" in source and "opt.step()" not in source


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 120000000000 bytes."),
    MemoryError()])
def test_running_out_of_memory_is_one_line_and_exit_1(monkeypatch, capsys, error):
    from revnets.cli import models

    def run(args):
        raise error
    monkeypatch.setattr(models, "run", run)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("revnets models: stopped: out of memory ("), err


def test_other_runtime_errors_are_not_taken_for_memory(monkeypatch):
    from revnets.cli import models

    def run(args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(models, "run", run)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["models"])
