"""groupvit_core never imports a framework: importing all of it leaves torch, tensorflow and keras unloaded."""

import os
import pkgutil
import subprocess
import sys

import groupvit_core

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _core_modules():
    names = ["groupvit_core"]
    for info in pkgutil.walk_packages(groupvit_core.__path__, prefix="groupvit_core."):
        if info.name != "groupvit_core.__main__":
            names.append(info.name)
    return names


def test_importing_every_core_module_leaves_frameworks_unimported():
    modules = _core_modules()
    assert "groupvit_core.config" in modules and "groupvit_core.weights" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "from groupvit_core.cli import build_parser\n"
        "build_parser()\n"
        "loaded = sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"groupvit_core imported {result.stdout.strip()}"


def test_cli_help_runs():
    result = subprocess.run([sys.executable, "-m", "groupvit_core", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("convert", "segment", "evaluate"):
        assert command in result.stdout
