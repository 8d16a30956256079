"""The Python environment a run was made in, built again from its commit's ``requirements.lock``.

A run records the digest of the lock its commit pins (tag ``catnet.lock``) and its Python version
(``catnet.versions``). ``pipeline.reproduce`` trains the run again in an environment made from that
lock, as ``make setup`` makes ``.venv`` (``python -m venv``, then ``pip install -r
requirements.lock`` through the package registries), kept in ``.cache/envs/<digest>`` (git-ignored)
and reused while its lock is; the project itself is the worktree's code, put first on
``PYTHONPATH`` (pipeline/reproduce.py), not installed into the cached environment, which any
worktree of the same lock shares. The cache keeps the ``envs_kept`` environments used last;
``make clean`` empties it.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from catnet.errors import ConfigError
from pipeline.common import ROOT
from pipeline.provenance import lock_digest as digest

CACHE = ROOT / ".cache" / "envs"
TRY_CURRENT = "env=current trains in this environment instead"


def pins(lock_text: str) -> dict[str, str]:
    """{normalized package name: version} of a lock's ``name==version`` lines."""
    found = {}
    for line in lock_text.splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)", line)
        if m:
            found[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return found


def differences(lock_text: str) -> list[str]:
    """``name pinned -> installed`` for each package of the lock this environment has otherwise."""
    import importlib.metadata as md

    out = []
    for name, pinned in sorted(pins(lock_text).items()):
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            installed = "not installed"
        if installed != pinned:
            out.append(f"{name} {pinned} -> {installed}")
    return out


def recorded_python(versions_tag: str) -> str | None:
    """The Python version a run's ``catnet.versions`` names (``python 3.11.7, numpy ...``)."""
    m = re.match(r"python (\d+\.\d+(?:\.\d+)?)", versions_tag or "")
    return m.group(1) if m else None


def ensure(lock_text: str, python_version: str | None, kept: int, commit: str) -> tuple[Path, str]:
    """(the Python of the environment ``lock_text`` pins, one line saying which and how long it
    took to build), built now if the cache does not hold it; a ConfigError naming why not."""
    here = platform.python_version()
    if python_version and python_version != here:
        raise ConfigError(f"the run was made with Python {python_version}, this is Python {here}: its environment "
                          f"cannot be built with this interpreter; {TRY_CURRENT}")
    key = digest(lock_text)
    folder = CACHE / key
    python = folder / "bin" / "python"
    shown = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    if (folder / ".complete").exists() and python.exists():
        (folder / ".complete").touch()  # used now: the cache keeps the environments used last
        line = f"environment: {shown} (requirements.lock of commit {commit[:12]}), reused"
    else:
        started = time.monotonic()
        _build(lock_text, folder)
        line = (f"environment: {shown} (requirements.lock of commit {commit[:12]}), built in "
                f"{time.monotonic() - started:.0f} s")
    prune(kept, keep=folder)
    return python, line


def _build(lock_text: str, folder: Path) -> None:
    """``python -m venv`` and ``pip install -r`` the lock, in a folder renamed into place once whole."""
    CACHE.mkdir(parents=True, exist_ok=True)
    building = CACHE / f".{folder.name}.building"
    shutil.rmtree(building, ignore_errors=True)
    try:
        _step([sys.executable, "-m", "venv", str(building)], "python -m venv")
        lock = building / "requirements.lock"
        lock.write_text(lock_text)
        _step([str(building / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-compile", "-r", str(lock)], "pip install -r requirements.lock")
        (building / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        shutil.rmtree(folder, ignore_errors=True)
        building.rename(folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _step(cmd: list[str], what: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        lines = [line for line in (out.stderr + out.stdout).splitlines()
                 if line.strip() and not line.startswith("WARNING: Location")]
        errors = [line for line in lines if line.startswith("ERROR:")]  # pip's last is the one that stopped it
        why = (errors or lines or ["failed"])[-1]
        raise ConfigError(f"the run's environment could not be built ({what}: {why.removeprefix('ERROR: ')}); "
                          f"{TRY_CURRENT}")


def prune(kept: int, keep: Path | None = None) -> list[Path]:
    """Remove all but the ``kept`` environments used last (never ``keep``); what was removed."""
    if not CACHE.is_dir():
        return []
    envs = sorted((p for p in CACHE.iterdir() if (p / ".complete").exists()),
                  key=lambda p: (p / ".complete").stat().st_mtime, reverse=True)
    removed = [p for p in envs[max(kept, 1):] if p != keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
