"""`newsletter new`: a commented issue file to start from."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from .checks import slugify
from .config import Config
from .errors import OutputError
from .render import Renderer

SKELETON_TEMPLATE = "skeleton.yaml"


def next_number(folder: Path) -> int | None:
    """One more than the highest `number:` among the issues already in the folder."""
    numbers = []
    for path in folder.glob("*.y*ml"):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if m := re.search(r"^number:\s*(\d+)\s*(?:#.*)?$", text, re.M):
            numbers.append(int(m.group(1)))
    return max(numbers) + 1 if numbers else None


def new_issue(config: Config, folder: Path, date: dt.date, title: str | None = None) -> Path:
    title = title or "Title of the lead story"
    path = Path(folder) / f"{date.isoformat()}-{slugify(title)}.yaml"
    if path.exists():
        raise OutputError(f"{path} already exists; pass another --title or --date")
    text = Renderer(config).render_template(SKELETON_TEMPLATE, {
        "publication": config.publication, "title": title, "date": date,
        "number": next_number(Path(folder)), "path": path,
    })
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path
