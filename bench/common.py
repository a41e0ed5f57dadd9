"""Helpers that more than one bench script uses (run the scripts from the repo root:
`python bench/NAME.py`; this folder is then on the import path)."""

from __future__ import annotations

import platform
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fresh_copy(template: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "newsletter.sqlite3"
    shutil.copyfile(template, target)
    return target


def ledger_counts(store: Path, issue: str) -> dict[str, int]:
    db = sqlite3.connect(store)
    try:
        return dict(db.execute("SELECT state, count(*) FROM deliveries WHERE issue = ? GROUP BY state", (issue,)))
    finally:
        db.close()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def tool_version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"unavailable ({exc})"
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "unavailable"
