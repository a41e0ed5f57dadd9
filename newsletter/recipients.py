"""Addresses and recipient lists: CSV in, clean unique recipients out, every bad row named.

A CSV needs a header row with `email`; `name` is optional; any other column is kept as a
merge field. Rows are streamed, never loaded whole.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .checks import address_problem, one_line_problem
from .errors import RecipientsError

@dataclass(frozen=True)
class Recipient:
    email: str
    name: str | None = None
    fields: dict[str, str] = field(default_factory=dict, compare=False)
    status: str = "subscribed"  # a CSV's `status` column (e.g. an export) is honoured


STATUSES = ("subscribed", "unsubscribed", "bounced", "complained")
# Columns that are not merge fields: ours, and the bookkeeping that `subscribers export` adds.
RESERVED_COLUMNS = ("email", "name", "status", "changed_at", "changed_how")


def normalize(address: str) -> str:
    """The form stored and compared: trimmed, domain lower-cased."""
    local, _, domain = address.strip().rpartition("@")
    return f"{local}@{domain.lower()}"


def clean_name(name: str | None) -> str | None:
    """The name, white space tidied; None for one that holds line breaks or control
    characters (never mended into something else) or is over 200 characters."""
    if name is None or one_line_problem(name.strip()):
        return None
    name = " ".join(name.split())
    return name if 0 < len(name) <= 200 else None


@dataclass
class CsvReport:
    read: int = 0
    duplicates: int = 0
    invalid: list[tuple[int, str, str]] = field(default_factory=list)  # (row, value, why)


def read_csv(path: str | Path, report: CsvReport) -> Iterator[Recipient]:
    """Yield each valid, first-seen recipient; invalid rows and duplicates go to `report`."""
    seen: set[str] = set()
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise RecipientsError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    with f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
        except (csv.Error, UnicodeDecodeError) as exc:
            raise RecipientsError(f"{path}: not a readable CSV file: {exc}") from exc
        columns = {c.strip().lower(): c for c in header if c}
        if "email" not in columns:
            raise RecipientsError(f"{path}:1: the header row needs an 'email' column (found: {', '.join(header) or 'nothing'})")
        try:
            for row in reader:
                report.read += 1
                line = reader.line_num
                raw = (row.get(columns["email"]) or "").strip()
                if problem := address_problem(raw):
                    report.invalid.append((line, raw, problem))
                    continue
                email = normalize(raw)
                if email.lower() in seen:
                    report.duplicates += 1
                    continue
                seen.add(email.lower())
                name = clean_name(row.get(columns["name"])) if "name" in columns else None
                status = (row.get(columns["status"]) or "").strip().lower() if "status" in columns else ""
                if status and status not in STATUSES:
                    report.invalid.append((line, status, f"unknown status; expected one of {', '.join(STATUSES)}"))
                    continue
                extra = {k.strip(): (v or "").strip() for k, v in row.items()
                         if k and k.strip().lower() not in RESERVED_COLUMNS}
                yield Recipient(email, name, extra, status or "subscribed")
        except (csv.Error, UnicodeDecodeError) as exc:
            raise RecipientsError(f"{path}:{reader.line_num}: not readable CSV: {exc}") from exc
