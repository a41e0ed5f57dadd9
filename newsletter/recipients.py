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

import codecs
import csv
import datetime as dt
import io
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


# A byte-order mark names the encoding; UTF-32's first, as its LE mark starts like UTF-16's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _lines(f: IO[bytes], path, encoding: str | None) -> Iterator[str]:
    """The file's lines as text, line ends kept: in the encoding its byte-order mark names,
    else `encoding` (default UTF-8). A line that does not decode stops the read, named."""
    start = f.read(4)
    bom, named = next(((b, e) for b, e in _BOMS if start.startswith(b)), (b"", None))
    if named in ("utf-16", "utf-32"):  # two or four bytes a character: the codec finds the lines
        f.seek(0)
        n = 0
        try:
            for n, line in enumerate(io.TextIOWrapper(f, named, newline=""), 1):
                yield line
        except UnicodeDecodeError as exc:
            raise RecipientsError(f"{path}:{n + 1}: not {named.upper()} text although it starts with a "
                                  f"{named.upper()} byte-order mark ({exc.reason})") from exc
        return
    encoding = named or encoding or "utf-8"
    f.seek(len(bom))
    for n, raw in enumerate(f, 1):
        try:
            yield raw.decode(encoding)
        except UnicodeDecodeError as exc:
            hint = "give the file's encoding with --encoding (e.g. cp1252 or latin-1)" if not named and \
                encoding == "utf-8" else "check the file's encoding"
            raise RecipientsError(f"{path}:{n}: not {codecs.lookup(encoding).name} text (byte 0x{raw[exc.start]:02X} at column "
                                  f"{exc.start + 1}); save the file as UTF-8, or {hint}") from exc


def read_csv(path: str | Path, report: CsvReport, encoding: str | None = None) -> Iterator[Recipient]:
    """Yield each valid, first-seen recipient; invalid rows and duplicates go to `report`.
    The encoding: the file's byte-order mark (UTF-8, UTF-16, UTF-32), else `encoding`, else UTF-8."""
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise RecipientsError(f"unknown encoding {encoding!r}; e.g. utf-8, cp1252, latin-1") from None
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise RecipientsError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    with f:
        yield from _read_rows(path, _lines(f, path, encoding), report)


def _read_rows(path, lines: Iterator[str], report: CsvReport) -> Iterator[Recipient]:
    seen: set[str] = set()
    # strict: a stray or unclosed quote is an error for its row, not a silent merge of rows
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader, [])
    except csv.Error as exc:
        raise RecipientsError(f"{path}:1: the header row is not readable CSV: {exc}") from exc
    names = [unescape_cell(c.strip()) for c in header]
    columns: dict[str, int] = {}
    for i, name in enumerate(names):
        if name and name.lower() in columns:
            raise RecipientsError(f"{path}:1: the header row names {name!r} twice")
        if name:
            columns[name.lower()] = i
    if "email" not in columns:
        raise RecipientsError(f"{path}:1: the header row needs an 'email' column (found: {', '.join(header) or 'nothing'})")
    field_columns = [(i, name) for i, name in enumerate(names) if name and name.lower() not in RESERVED_COLUMNS]

    while True:
        line = reader.line_num + 1  # where this row starts (a quoted value may span lines)
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            report.read += 1
            report.invalid.append((line, "", _csv_problem(str(exc), line, reader.line_num)))
            continue
        if not any(c.strip() for c in cells):
            continue  # a blank row, or one of only commas as spreadsheets write them
        report.read += 1
        cells = [unescape_cell(c.strip()) for c in cells]

        def cell(name: str) -> str:
            i = columns.get(name)
            return cells[i] if i is not None and i < len(cells) else ""

        raw = cell("email")
        if len(cells) > len(header):
            report.invalid.append((line, raw, f"{len(cells)} values but {len(header)} columns in the header "
                                   "(a value with a comma in it needs double quotes)"))
            continue
        if any("\x00" in c for c in cells):
            report.invalid.append((line, raw, "holds a NUL byte; the file may be damaged"))
            continue
        if problem := address_problem(raw):
            report.invalid.append((line, raw, problem))
            continue
        suppressed = cell("suppressed") or None
        status = cell("status").lower()
        # a suppression of an address that is no subscriber is kept as written
        email = raw if suppressed and not status else normalize(raw)
        if email.lower() in seen:
            report.duplicates += 1
            continue
        seen.add(email.lower())
        if status and status not in STATUSES:
            report.invalid.append((line, status, f"unknown status; expected one of {', '.join(STATUSES)}"))
            continue
        changed_at, suppressed_at = cell("changed_at") or None, cell("suppressed_at") or None
        if bad := next((t for t in (changed_at, suppressed_at) if t and not _is_time(t)), None):
            report.invalid.append((line, bad, "expected a date and time like 2024-05-01T09:30:00+00:00"))
            continue
        extra = {name: cells[i] if i < len(cells) else "" for i, name in field_columns}
        try:
            absent = json.loads(cell(ABSENT) or "[]")
            for name in absent:
                del extra[name]
        except (ValueError, TypeError, KeyError):
            report.invalid.append((line, cell(ABSENT), f"{ABSENT}: expected a JSON list of this "
                                   "file's field columns, as `subscribers export` writes it"))
            continue
        yield Recipient(email, clean_name(cell("name")), extra,
                        status or ("" if suppressed else "subscribed"),
                        changed_at, cell("changed_how") or None, suppressed, suppressed_at)


def _csv_problem(message: str, first: int, last: int) -> str:
    if "unexpected end of data" in message:
        return (f"a double quote opened in this row is never closed: lines {first}-{last} were read as one value "
                "(a quote inside a value is written twice: \"\")")
    if "expected after" in message:
        return "text after a closing double quote (a quote inside a value is written twice: \"\")"
    if "field limit" in message:
        return f"a value longer than {csv.field_size_limit():,} characters"
    return f"not readable CSV: {message}"


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
