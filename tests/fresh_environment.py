"""A copy of the checkout and a fresh virtual environment, for the tests of what an install ships and of the
scripts that install the project themselves (issue 25): tests/test_packaging.py, tests/test_gpu_suite.py."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def copy_checkout(destination: Path) -> Path:
    """The files git tracks or would track (tracked, and untracked but not ignored: what a commit or the device
    tool takes along), copied to ``destination``: no build output, no virtual environment, no install."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPOSITORY,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPOSITORY / name
        if source.is_file():  # a tracked file deleted in the working tree is not part of the copy
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def fresh_environment(path: Path) -> Path:
    """A virtual environment at ``path`` that sees the packages of this test's environment (torch and the
    rest: nothing to download) but no install of fishr-lightning; its ``bin`` folder.

    Not ``venv --system-site-packages``: in a virtual environment (a developer's, CI's) that sees the base
    interpreter's packages, not this one's. The site-packages folders are named in a ``.pth`` file instead,
    which puts them on ``sys.path`` without running their own ``.pth`` files: the editable install of the
    checkout (a ``.pth`` file and an import hook) stays out, so only what the test installs is importable.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    purelib = subprocess.run(
        [str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    outer = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (Path(purelib) / "outer_environment.pth").write_text("".join(f"{folder}\n" for folder in outer))
    return path / "bin"


def module_origin(python: Path, module: str) -> Path:
    """Where ``python`` would import ``module`` from, without importing it (nor torch)."""
    code = f"import importlib.util; print(importlib.util.find_spec({module!r}).origin)"
    return Path(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip())
