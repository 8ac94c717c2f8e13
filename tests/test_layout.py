"""The walls of the layout: trio stays inside ``daemon/``, and the light
side (the CLI, the client, ``lease -- CMD``, ``gc`` and the inert pytest
plugin) imports no trio, msgspec or psutil when it is imported.

Checked two ways: statically, over every import statement of every module
outside ``daemon/`` (so that a lazy ``import trio`` in a function is caught
too), and in fresh interpreters, by what lands in ``sys.modules``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Runtime

import tractor_session

PACKAGE = Path(tractor_session.__file__).parent
LIGHT = ["cli", "commands", "client", "run", "gc", "pytest_plugin", "envelope", "paths", "wire", "holder", "shell", "status"]
HEAVY = ("trio", "msgspec", "psutil")


def _imports(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, at any depth."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_outside_the_daemon_package_imports_trio() -> None:
    outside = [p for p in PACKAGE.rglob("*.py") if "daemon" not in p.relative_to(PACKAGE).parts]
    assert outside, "no modules found"
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n == "trio" or n.startswith("trio."))
        for p in outside
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_serve_reaches_into_the_daemon_package() -> None:
    """The one way from the light side into trio is ``tractor-session serve``."""
    reaching = sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.glob("*.py")
        if any(n.startswith("tractor_session.daemon") for n in _imports(p))
    )
    assert reaching == ["commands.py"]
    commands = ast.parse((PACKAGE / "commands.py").read_text())
    module_level = [n for n in commands.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not any(
        isinstance(n, ast.ImportFrom) and (n.module or "").startswith("tractor_session.daemon")
        for n in module_level
    )


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_nothing_heavy(module: str) -> None:
    code = (
        "import sys\n"
        f"import tractor_session.{module}\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


def test_gc_without_a_daemon_never_imports_trio(runtime: Runtime) -> None:
    code = (
        "import sys\n"
        "from tractor_session.cli import main\n"
        "status = main(['gc', '--dry-run'])\n"
        "print(status, 'trio' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=runtime.env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["0", "False"], done.stdout
    assert "directly (no daemon runs)" in done.stdout
    assert runtime.daemon_pid() is None


def test_every_module_stays_readable_in_one_pass() -> None:
    """Under ~400 lines each: a module that grows past that does two jobs."""
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > 420} == {}


def test_rtvars_defaults_agree_with_the_envelope_writer() -> None:
    from tractor_session.envelope import TRACTOR_DEFAULTS
    from tractor_session.rtvars import RuntimeVars

    defaults = RuntimeVars().to_dict()
    assert {k: defaults[k] for k in TRACTOR_DEFAULTS} == TRACTOR_DEFAULTS
    assert list(defaults)[: len(TRACTOR_DEFAULTS)] == list(TRACTOR_DEFAULTS)
