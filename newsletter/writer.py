"""The only module that writes the build output folder.

Each file is written to a temporary name and renamed into place, so a reader (a web
server, a later send) never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OutputError
from .render import Rendered

EMAIL_HTML = "email.html"
EMAIL_TEXT = "email.txt"
WEB_PAGE = "index.html"


def write_atomic(path: Path, data: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_issue(rendered: Rendered, out_dir: Path) -> Path:
    """Write email.html, email.txt and the web page into out_dir/<issue stem>/."""
    folder = Path(out_dir) / rendered.issue.stem
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / EMAIL_HTML, rendered.html)
        write_atomic(folder / EMAIL_TEXT, rendered.text)
        write_atomic(folder / WEB_PAGE, rendered.web_html)
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror or exc}") from exc
    return folder


def write_if_changed(path: Path, data: str) -> bool:
    """Write `data` unless the file already holds exactly these bytes (its mtime then stays,
    so a sync to the web server copies only what changed). True if it was written."""
    encoded = data.encode("utf-8")
    try:
        if path.read_bytes() == encoded:
            return False
    except FileNotFoundError:
        pass
    write_atomic(path, data)
    return True
