"""Subscriber CSVs that are not what they should be: other encodings, broken quoting, blank
rows, NUL bytes, stray cells, random bytes, and 100,000 rows of which hundreds are bad. Every
bad row is reported by its line, every good one kept, through `read_csv` (what `subscribers
import` and `send --to` read with) and through `python -m newsletter subscribers import`.

The encoding: a byte-order mark names it (UTF-8, UTF-16, UTF-32); without one the file is
UTF-8, or what `subscribers import --encoding` says. A file that does not decode is refused
whole, naming the line, and nothing is imported.

And what `subscribers export` writes: no cell a spreadsheet would run as a formula, and an
import of the export gives back exactly what was stored.
"""

from __future__ import annotations

import csv
import io
import random
import re
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli as run
from newsletter.errors import RecipientsError
from newsletter.recipients import CsvReport, Recipient, clean_name, read_csv, write_csv
from newsletter.store import Store

CSV_EXAMPLES = 200
PEOPLE = "email,name,city\nada@example.com,Zoë Ådahl,Zürich\nbob@example.com,“Bob”,Köln\n"
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def read(path, encoding=None):
    report = CsvReport()
    return list(read_csv(path, report, encoding)), report


def skipped(stderr: str, name: str) -> dict[int, str]:
    return {int(m[1]): m[2] for m in re.finditer(re.escape(name) + r":(\d+): skipped .*?: (.+)", stderr)}


def imported(folder) -> dict[str, tuple]:
    db = sqlite3.connect(folder / "newsletter.sqlite3")
    try:
        return {r[0]: r[1:] for r in db.execute("SELECT email, name, fields, status FROM subscribers")}
    finally:
        db.close()


# -- encodings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding,bom", [("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe"),
                                          ("utf-16-be", b"\xfe\xff"), ("utf-32-le", b"\xff\xfe\x00\x00"),
                                          ("utf-32-be", b"\x00\x00\xfe\xff")])
def test_a_byte_order_mark_names_the_encoding(tmp_path, encoding, bom):
    path = tmp_path / "people.csv"
    path.write_bytes(bom + PEOPLE.replace("\n", "\r\n").encode(encoding))
    got, report = read(path)
    assert [(r.email, r.name, r.fields) for r in got] == [("ada@example.com", "Zoë Ådahl", {"city": "Zürich"}),
                                                          ("bob@example.com", "“Bob”", {"city": "Köln"})]
    assert report.read == 2 and not report.invalid


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_another_encoding_without_a_mark_is_refused_naming_the_line_unless_given(project, encoding):
    text = "email,name\n" + "".join(f"r{i}@example.com,Reader {i}\n" for i in range(500)) + \
        "ada@example.com,Zoë\n"  # line 502: the first byte that is not UTF-8
    path = project / "people.csv"
    path.write_bytes(text.encode(encoding))
    with pytest.raises(RecipientsError, match=r"people\.csv:502: not utf-8 text \(byte 0xEB at column 19\); "
                                              r"save the file as UTF-8, or give .*--encoding"):
        read(path)
    result = run("subscribers", "import", "people.csv", cwd=project)
    assert result.returncode == 2 and "people.csv:502: not utf-8 text" in result.stderr
    assert not (project / "newsletter.sqlite3").exists() or imported(project) == {}  # all or nothing
    result = run("subscribers", "import", "people.csv", "--encoding", encoding, cwd=project)
    assert result.returncode == 0, result.stderr
    rows = imported(project)
    assert len(rows) == 501 and rows["ada@example.com"][0] == "Zoë"
    assert run("subscribers", "import", "people.csv", "--encoding", "klingon", cwd=project).returncode == 2


# -- broken rows -------------------------------------------------------------------------------

BROKEN = (
    "email,name,city\n"                               # 1
    "ada@example.com,Ada,London\n"                    # 2
    "\n"                                              # 3 blank: skipped, not a row
    ",,\n"                                            # 4 blank as spreadsheets write it
    '"bob@example.com"x,Bob,Paris\n'                  # 5 text after a closing quote
    "cy@example.com,Lovelace, Cy,Rome\n"              # 6 a comma not quoted: one cell too many
    "d\x00n@example.com,Dan,Oslo\n"                   # 7 NUL in the address
    "eve@example.com,E\x00ve,Bern\n"                  # 8 NUL in the name
    'fay@example.com,"Fay ""the"" Great",Lima\n'      # 9 quotes done right
    'gus@example.com,"Gus\nSecond line",Kiev\n'       # 10-11 a quoted line break: kept, name dropped
    "hal@example.com\n"                               # 12 fewer cells: fine
    "ivy@example.com,Ivy," + "x" * 200_000 + "\n"     # 13 a value over the csv module's limit
    "jo@example.com,Jo,Quito\n"                       # 14
    'kim@example.com,"Kim,Never closed\n'             # 15 an open quote to the end: 15-16 one value
    "lee@example.com,Lee,Lost\n"                      # 16
)


def test_every_broken_row_is_named_and_every_good_one_kept(tmp_path, project):
    (project / "broken.csv").write_bytes(BROKEN.encode("utf-8"))
    got, report = read(project / "broken.csv")
    assert [r.email for r in got] == ["ada@example.com", "fay@example.com", "gus@example.com", "hal@example.com",
                                      "jo@example.com"]
    assert [r.name for r in got] == ["Ada", 'Fay "the" Great', None, None, "Jo"]
    bad = {row: why for row, _, why in report.invalid}
    assert sorted(bad) == [5, 6, 7, 8, 13, 15]
    assert "after a closing double quote" in bad[5]
    assert "4 values but 3 columns" in bad[6]
    assert "NUL" in bad[7] and "NUL" in bad[8]
    assert "longer than" in bad[13]
    assert "never closed: lines 15-16" in bad[15]
    assert report.read == 11  # blank rows are not rows

    result = run("subscribers", "import", "broken.csv", cwd=project)
    assert result.returncode == 1
    assert sorted(skipped(result.stderr, "broken.csv")) == [5, 6, 7, 8, 13, 15]
    assert "11 row(s): 5 added" in result.stdout and "6 invalid" in result.stdout
    assert sorted(imported(project)) == sorted(r.email for r in got)


def test_a_header_that_names_a_column_twice_is_refused(tmp_path):
    (tmp_path / "twice.csv").write_text("email,name,Email\na@example.com,A,b@example.com\n")
    with pytest.raises(RecipientsError, match=r"twice\.csv:1: the header row names 'Email' twice"):
        read(tmp_path / "twice.csv")


def test_a_hundred_thousand_rows_with_hundreds_bad_at_known_lines(project):
    rng = random.Random(12)
    lines, bad, good = ["email,name,plan"], set(), 0
    kinds = ["no-at-sign.example.com,X,p", "zoë@example.com,X,p", "a b@example.com,X,p", ",Nobody,p",
             '"q@example.com"z,X,p', "x@example.com,Too,Many,Cells", "n\x00@example.com,X,p", "x@exa_mple.com,X,p"]
    for i in range(2, 100_002):  # file line numbers
        if rng.random() < 0.004:
            lines.append(rng.choice(kinds))
            bad.add(i)
        else:
            lines.append(f"reader{i}@example.com,Reader {i},{rng.choice(['free', 'pro', '=SUM(A1)'])}")
            good += 1
    (project / "big.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    assert 300 <= len(bad) <= 500
    result = run("subscribers", "import", "big.csv", cwd=project)
    assert result.returncode == 1, result.stderr[-2000:]
    assert set(skipped(result.stderr, "big.csv")) == bad  # each bad row by its line, and no other
    assert f"100000 row(s): {good} added" in result.stdout and f"{len(bad)} invalid" in result.stdout
    rows = imported(project)
    assert len(rows) == good
    assert rows["reader99999@example.com"][0] == "Reader 99999"


# -- whatever the bytes, a clear answer ----------------------------------------------------------

csv_cell = st.one_of(st.text(max_size=12), st.sampled_from(
    ['"', '""', '"a"b', "a@example.com", "=1+1", "\x00", "\r", "\n", ",", "'", "\ufeff", "é"]))
csv_bytes = st.one_of(
    st.binary(max_size=400),
    st.builds(lambda rows, enc: ("email,name,x\n" + "\n".join(",".join(r) for r in rows)).encode(enc, "replace"),
              st.lists(st.lists(csv_cell, max_size=5), max_size=12),
              st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"])))


@settings(max_examples=CSV_EXAMPLES, deadline=None, database=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
@given(data=csv_bytes)
def test_random_csv_bytes_give_recipients_or_named_rows_or_one_clear_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("csv") / "random.csv"
    path.write_bytes(data)
    try:
        got, report = read(path)
    except RecipientsError as exc:
        assert re.match(re.escape(str(path)) + r":\d+: ", str(exc)), exc
        return
    lines = data.count(b"\n") + data.count(b"\r") + 1
    assert all(1 < row <= lines + 1 and why for row, _, why in report.invalid), report.invalid
    assert len(got) + len(report.invalid) + report.duplicates == report.read
    for r in got:
        assert "\x00" not in r.email + (r.name or "") + "".join(r.fields.values())


# -- export: no formulas, and back again -----------------------------------------------------------

values = st.text(st.characters(exclude_characters="\x00"), max_size=15).map(str.strip)
formulas = st.sampled_from(["=1+1", "+1", "-1", "@SUM(A1)", "\t=1", "\r=1", "'=1", "''", "'", "=HYPERLINK(\"x\")",
                            "-", "'plain"])


@settings(max_examples=CSV_EXAMPLES // 2, deadline=None, database=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
@given(people=st.lists(st.tuples(st.one_of(values, formulas), st.one_of(values, formulas),
                                 st.one_of(values, formulas)), min_size=1, max_size=6))
def test_export_neutralises_formulas_and_imports_back_exactly(tmp_path_factory, people):
    folder = tmp_path_factory.mktemp("store")
    stored = {}
    with Store(folder / "a.sqlite3") as store:
        for i, (name, city, plan) in enumerate(people):
            # names as every way in leaves them (import, `subscribers add`, sign-up): one clean line
            recipient = Recipient(f"r{i}@example.com", clean_name(name), {"city": city, "=plan": plan})
            store.add(recipient, "test")
        stored = {row[0]: row[1:4] for row in store.subscribers()}
    out = io.StringIO()
    with Store(folder / "a.sqlite3") as store:
        write_csv(out, store)
    for row in csv.reader(io.StringIO(out.getvalue())):
        for cell in row:
            assert not cell.startswith(FORMULA_START), (cell, row)
    (folder / "export.csv").write_text(out.getvalue(), encoding="utf-8", newline="")
    got, report = read(folder / "export.csv")
    assert not report.invalid
    with Store(folder / "b.sqlite3") as store:
        for recipient in got:
            store.add(recipient, "import")
        assert {row[0]: row[1:4] for row in store.subscribers()} == stored


def test_export_through_the_cli_round_trips_formula_cells(project):
    (project / "in.csv").write_text('email,name,note\n'
                                    'ada@example.com,=cmd|\' /C calc\'!A0,"@SUM(1+1)"\n'
                                    "bob@example.com,+Bob,'-1\n", encoding="utf-8")
    assert run("subscribers", "import", "in.csv", cwd=project).returncode == 0
    before = imported(project)
    assert before["ada@example.com"][0] == "=cmd|' /C calc'!A0"
    assert before["bob@example.com"][1] == '{"note": "-1"}'  # one apostrophe before a formula is the escape
    assert run("subscribers", "export", "--out", "out.csv", cwd=project).returncode == 0
    cells = [c for row in csv.reader(open(project / "out.csv", encoding="utf-8")) for c in row]
    assert "'=cmd|' /C calc'!A0" in cells and "'@SUM(1+1)" in cells and "'+Bob" in cells
    assert not any(c.startswith(FORMULA_START) for c in cells)
    (project / "newsletter.sqlite3").unlink()
    assert run("subscribers", "import", "out.csv", cwd=project).returncode == 0
    assert imported(project) == before
