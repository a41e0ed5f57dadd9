"""Addresses and recipient lists: CSV in, clean unique recipients out, every bad row named;
and the store's subscribers and suppressions out as CSV again (`subscribers export`).

A CSV needs a header row with `email`; `name` is optional; any other column is kept as a
merge field. Rows are streamed, never loaded whole.

Export and import undo each other exactly. A cell that a spreadsheet would run as a
formula (it starts with =, +, -, @, a tab or a carriage return) is written with an
apostrophe in front, as is a cell that starts with an apostrophe; reading takes one such
apostrophe off again.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from .checks import address_problem, one_line_problem
from .errors import RecipientsError

@dataclass(frozen=True)
class Recipient:
    email: str
    name: str | None = None
    fields: dict[str, str] = field(default_factory=dict, compare=False)
    status: str = "subscribed"  # a CSV's `status` column (e.g. an export) is honoured; "": no subscriber
    # From an export: when and how the status last changed, and the address's suppression
    changed_at: str | None = field(default=None, compare=False)
    changed_how: str | None = field(default=None, compare=False)
    suppressed: str | None = field(default=None, compare=False)  # the reason
    suppressed_at: str | None = field(default=None, compare=False)


STATUSES = ("subscribed", "unsubscribed", "bounced", "complained")
EXPORT_COLUMNS = ("email", "name", "status", "changed_at", "changed_how")
SUPPRESSION_COLUMNS = ("suppressed", "suppressed_at")  # the reason, and since when
ABSENT = "absent_fields"  # a JSON list of the field columns this subscriber has no value in
# Columns that are not merge fields: ours, and the bookkeeping that `subscribers export` adds.
RESERVED_COLUMNS = (*EXPORT_COLUMNS, *SUPPRESSION_COLUMNS, ABSENT)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def escape_cell(value: str) -> str:
    """A cell no spreadsheet runs as a formula (the apostrophe is the spreadsheets' own
    "this is text" mark); unescape_cell gives the value back."""
    return "'" + value if value.startswith((*_FORMULA_START, "'")) else value


def unescape_cell(value: str) -> str:
    return value[1:] if value.startswith("'") and value[1:].startswith((*_FORMULA_START, "'")) else value


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
        columns = {unescape_cell(c.strip()).lower(): c for c in header if c}
        if "email" not in columns:
            raise RecipientsError(f"{path}:1: the header row needs an 'email' column (found: {', '.join(header) or 'nothing'})")
        field_columns = [(c, unescape_cell(c.strip())) for c in header
                         if c and unescape_cell(c.strip()).lower() not in RESERVED_COLUMNS]

        def cell(row, name: str) -> str:
            return unescape_cell((row.get(columns[name]) or "").strip()) if name in columns else ""

        try:
            for row in reader:
                report.read += 1
                line = reader.line_num
                raw = cell(row, "email")
                if problem := address_problem(raw):
                    report.invalid.append((line, raw, problem))
                    continue
                suppressed = cell(row, "suppressed") or None
                status = cell(row, "status").lower()
                # a suppression of an address that is no subscriber is kept as written
                email = raw if suppressed and not status else normalize(raw)
                if email.lower() in seen:
                    report.duplicates += 1
                    continue
                seen.add(email.lower())
                if status and status not in STATUSES:
                    report.invalid.append((line, status, f"unknown status; expected one of {', '.join(STATUSES)}"))
                    continue
                changed_at, suppressed_at = cell(row, "changed_at") or None, cell(row, "suppressed_at") or None
                if bad := next((t for t in (changed_at, suppressed_at) if t and not _is_time(t)), None):
                    report.invalid.append((line, bad, "expected a date and time like 2024-05-01T09:30:00+00:00"))
                    continue
                extra = {name: unescape_cell((row.get(c) or "").strip()) for c, name in field_columns}
                try:
                    absent = json.loads(cell(row, ABSENT) or "[]")
                    for name in absent:
                        del extra[name]
                except (ValueError, TypeError, KeyError):
                    report.invalid.append((line, cell(row, ABSENT), f"{ABSENT}: expected a JSON list of this "
                                           "file's field columns, as `subscribers export` writes it"))
                    continue
                yield Recipient(email, clean_name(cell(row, "name")), extra,
                                status or ("" if suppressed else "subscribed"),
                                changed_at, cell(row, "changed_how") or None, suppressed, suppressed_at)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise RecipientsError(f"{path}:{reader.line_num}: not readable CSV: {exc}") from exc


def _is_time(text: str) -> bool:
    try:
        dt.datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def write_csv(out: IO[str], store) -> None:
    """Every subscriber (status, when and how it changed, one column per merge field) and
    every suppression, subscriber or not, as `read_csv` reads them back. Columns beyond
    the first five are written only when something needs them."""
    names = sorted({name for *_, fields in _fields_of(store) for name in fields})
    suppressions = {email.lower(): (email, reason, at) for email, reason, at in store.suppressions()}
    absent_needed = any(set(fields) != set(names) for *_, fields in _fields_of(store))
    header = [*EXPORT_COLUMNS, *names, *(SUPPRESSION_COLUMNS if suppressions else ()), *((ABSENT,) if absent_needed else ())]
    writer = csv.writer(out)
    writer.writerow([escape_cell(c) for c in header])
    for (email, name, _, status, changed_at, how), fields in _fields_of(store):
        row = [email, name or "", status, changed_at, how, *(fields.get(n, "") for n in names)]
        if suppressions:
            row += suppressions.pop(email.lower(), ("", "", ""))[1:]
        if absent_needed:
            absent = [n for n in names if n not in fields]
            row.append(json.dumps(absent, ensure_ascii=False) if absent else "")
        writer.writerow([escape_cell(c) for c in row])
    for email, reason, at in suppressions.values():  # suppressed, but no subscriber
        row = [email, "", "", "", "", *([""] * len(names)), reason, at] + ([""] if absent_needed else [])
        writer.writerow([escape_cell(c) for c in row])


def _fields_of(store) -> Iterator[tuple[tuple, dict]]:
    for row in store.subscribers():
        yield row, json.loads(row[2]) if row[2] else {}
