"""Issue files: every kind of mistake is reported with file, line, column, field and what
was expected, all of them in one run, and nothing the file holds raises."""

import datetime as dt

import pytest

from conftest import EXAMPLE, MINIMAL, run_cli
from newsletter.errors import IssueError
from newsletter.reader import load_issue, parse_date, read_issue


def errors(path):
    return [p for p in load_issue(path).problems if p.is_error]


def warnings(path):
    return [p for p in load_issue(path).problems if not p.is_error]


def where(problem):
    return (problem.line, problem.col, problem.field)


def test_the_example_issue_is_valid_and_complete():
    result = load_issue(EXAMPLE)
    assert result.problems == []
    issue = result.issue
    assert issue.subject == "China is ready to recognize a Taliban-run Afghanistan"
    assert issue.date == dt.date(2021, 8, 13)
    assert issue.lead.source == "U.S. News"
    assert issue.lead.url.startswith("https://www.usnews.com/")
    assert issue.lead.quote.by == "Jen Psaki, White House spokeswoman"
    assert "final war" in issue.commentary.body.text
    assert [link.source for link in issue.related] == ["Foreign Policy", "VOA News", "ADL"]
    assert issue.related[1].date == dt.date(2021, 2, 9)
    assert issue.related[0].date is None  # the original's "August 39, 2017" is not a date
    assert issue.stem == "2021-08-13-china-taliban"


def test_minimal_issue_reads(write_issue):
    issue = read_issue(write_issue(MINIMAL))
    assert issue.lead.body.text == "First paragraph."
    assert issue.commentary is None and issue.related == ()


def test_problem_format_is_path_line_col_field_message(write_issue):
    path = write_issue(MINIMAL.replace("https://example.com/story", "javascript:alert(1)"))
    [problem] = errors(path)
    assert str(problem) == (f"{path}:7:8: lead.url: expected an absolute http(s) URL, "
                            "got 'javascript:alert(1)'")


def test_malformed_yaml_reports_its_position(write_issue):
    path = write_issue("subject: x\ndate: 2024-01-01\nlead: [unclosed\n")
    [problem] = errors(path)
    assert problem.message.startswith("invalid YAML")
    assert problem.line == 4


def test_bad_indentation_is_reported_not_raised(write_issue):
    path = write_issue("subject: x\n  date: 2024-01-01\n")
    [problem] = errors(path)
    assert problem.message.startswith("invalid YAML") and problem.line == 2


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(write_issue, text):
    [problem] = errors(write_issue(text))
    assert "empty" in problem.message and problem.line == 1


def test_top_level_must_be_a_mapping(write_issue):
    [problem] = errors(write_issue("- just\n- a list\n"))
    assert "expected a mapping" in problem.message and "got a list" in problem.message


def test_missing_required_keys_point_at_the_mapping(write_issue):
    path = write_issue("""\
        subject: Hello
        date: 2024-03-01
        lead:
          source: Example
          body: Text.
        """)
    found = {p.field: p for p in errors(path)}
    assert set(found) == {"lead.title", "lead.url"}
    assert (found["lead.url"].line, found["lead.url"].col) == (4, 3)  # where lead's mapping starts
    assert "required key is missing" in found["lead.url"].message


def test_missing_top_level_keys(write_issue):
    path = write_issue("preheader: only this\n")
    assert {p.field for p in errors(path)} == {"subject", "date", "lead"}


def test_unknown_key_suggests_the_close_match(write_issue):
    path = write_issue(MINIMAL + "releated:\n  - source: X\n")
    [problem] = errors(path)
    assert where(problem) == (10, 1, "releated")
    assert problem.message == "unknown key; did you mean 'related'?"


def test_unknown_key_without_a_close_match_lists_the_known_ones(write_issue):
    path = write_issue(MINIMAL.replace("  source:", "  zzz: 1\n  source:"))
    [problem] = errors(path)
    assert problem.field == "lead.zzz" and "expected one of source, title, url" in problem.message


def test_wrong_types(write_issue):
    path = write_issue("""\
        subject: [not, a, string]
        date: 2024-03-01
        lead: just text
        related: {source: x}
        """)
    found = {p.field: p.message for p in errors(path)}
    assert found["subject"] == "expected one line of text, got a list"
    assert found["lead"] == "expected a mapping of keys to values, got 'just text'"
    assert found["related"].startswith("expected a list")


def test_yaml_scalars_are_taken_as_written_for_text(write_issue):
    # The "Norway problem": no, yes, numbers and dates are text where text is expected.
    path = write_issue(MINIMAL.replace("title: Something happened", "title: no")
                       .replace("source: Example News", "source: 1984"))
    issue = read_issue(path)
    assert issue.lead.title == "no" and issue.lead.source == "1984"


@pytest.mark.parametrize("value,expected", [
    ("2021-02-09", dt.date(2021, 2, 9)),
    ('"February 9, 2021"', dt.date(2021, 2, 9)),
    ("Feb. 9, 2021", dt.date(2021, 2, 9)),
    ("9 February 2021", dt.date(2021, 2, 9)),
])
def test_dates_in_both_forms(write_issue, value, expected):
    path = write_issue(MINIMAL + f"related:\n  - source: S\n    title: T\n    url: https://e.com/\n    date: {value}\n")
    assert read_issue(path).related[0].date == expected


@pytest.mark.parametrize("value,message", [
    ("August 39, 2017", "'August 39, 2017' is not a real date"),
    ("2021-02-30", "'2021-02-30' is not a real date"),
    ("Smarch 3, 2021", "expected a date as 2021-02-09"),
    ("yesterday", "expected a date as 2021-02-09"),
])
def test_dates_that_are_not_real(write_issue, value, message):
    path = write_issue(MINIMAL + f"related:\n  - source: S\n    title: T\n    url: https://e.com/\n    date: {value}\n")
    [problem] = errors(path)
    assert where(problem) == (14, 11, "related[0].date")
    assert problem.message.startswith(message)


@pytest.mark.parametrize("url", [
    "javascript:alert(1)", "JAVASCRIPT:alert(1)", "data:text/html,hi", "vbscript:x",
    "/relative/path", "example.com/story", "ftp://example.com/file", "https://", "https://exa mple.com/",
])
def test_urls_must_be_absolute_http(write_issue, url):
    path = write_issue(MINIMAL.replace("https://example.com/story", f'"{url}"'))
    [problem] = errors(path)
    assert problem.field == "lead.url"
    assert "expected an absolute http(s) URL" in problem.message


def test_plain_http_is_a_warning(write_issue):
    path = write_issue(MINIMAL.replace("https://example.com/story", "http://example.com/story"))
    assert errors(path) == []
    [problem] = warnings(path)
    assert problem.field == "lead.url" and "plain http" in problem.message and problem.line == 7


@pytest.mark.parametrize("value,message", [
    ('"Line one\\nline two"', "must be one line"),
    ('"Bell \\a here"', "control character (U+0007)"),
    ('"Escape \\e here"', "control character (U+001B)"),
])
def test_one_line_fields_reject_breaks_and_control_characters(write_issue, value, message):
    path = write_issue(MINIMAL.replace("subject: A small issue", f"subject: {value}"))
    [problem] = errors(path)
    assert problem.field == "subject" and message in problem.message and problem.line == 1


def test_subject_length_limit(write_issue):
    path = write_issue(MINIMAL.replace("A small issue", "x" * 151))
    [problem] = errors(path)
    assert problem.message == "is 151 characters long; at most 150 are allowed"


def test_image_needs_alt_text(write_issue):
    path = write_issue(MINIMAL + "  image: {url: https://example.com/a.png, width: 300}\n")
    [problem] = errors(path)
    assert problem.field == "lead.image.alt" and "required key is missing" in problem.message
    assert "describe the image" in problem.message


def test_image_width_must_fit_the_column(write_issue):
    path = write_issue(MINIMAL + "  image: {url: https://example.com/a.png, alt: A map, width: 2000}\n")
    [problem] = errors(path)
    assert problem.field == "lead.image.width" and "from 1 to 600" in problem.message


def test_every_error_in_the_file_is_reported_in_one_run(write_issue):
    path = write_issue("""\
        subject: "two\\nlines"
        date: 2021-02-30
        lead:
          source: Example
          titel: Misspelt
          url: javascript:alert(1)
          body: Text.
          image: {url: https://example.com/a.png}
        related:
          - source: A
            title: B
            url: ftp://x
            date: August 39, 2017
          - title: no source
            url: https://example.com/
        """)
    found = sorted(where(p) for p in errors(path))
    assert found == [
        (1, 10, "subject"),
        (2, 7, "date"),
        (4, 3, "lead.title"),
        (5, 3, "lead.titel"),
        (6, 8, "lead.url"),
        (8, 10, "lead.image.alt"),
        (12, 10, "related[0].url"),
        (13, 11, "related[0].date"),
        (14, 5, "related[1].source"),
    ]


def test_duplicate_keys_are_errors(write_issue):
    path = write_issue(MINIMAL + "subject: Again\n")
    [problem] = errors(path)
    assert where(problem) == (10, 1, "subject") and "first given on line 1" in problem.message


def test_aliases_are_refused_not_expanded(write_issue):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi"))
    path = write_issue(MINIMAL + "related:\n  - &item {source: S, title: T, url: 'https://e.com/'}\n  - *item\n")
    [problem] = errors(path)
    assert problem.field == "related[1]" and "aliases" in problem.message
    assert errors(write_issue(bomb, "bomb.yaml"))  # reported, quickly, without expanding


def test_more_than_one_document(write_issue):
    [problem] = errors(write_issue(MINIMAL + "---\n" + MINIMAL))
    assert "more than one YAML document" in problem.message and problem.line == 11


def test_markdown_link_problems_point_at_their_line(write_issue):
    path = write_issue(MINIMAL.replace("    First paragraph.\n",
                                       "    First paragraph.\n\n    See [this](javascript:alert(1)).\n"
                                       "    And [that](http://example.com/).\n    ![pic](https://e.com/p.png)\n"))
    problems = load_issue(path).problems
    found = {(p.line, p.severity): p.message for p in problems}
    assert found[(11, "error")] == "link: expected an absolute http/https/mailto URL, got 'javascript:alert(1)'"
    assert "plain http" in found[(12, "warning")]
    assert "images are not allowed" in found[(13, "error")]


def test_warnings_do_not_make_the_issue_invalid(write_issue):
    path = write_issue(MINIMAL.replace("preheader: What this issue is about.\n", "")
                       .replace("A small issue", "A subject line that goes on for much longer than a phone shows"))
    result = load_issue(path)
    assert result.issue is not None
    assert {p.field for p in result.problems} == {"preheader", "subject"}
    assert all(not p.is_error for p in result.problems)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(MINIMAL.replace("First", "Caf\xe9").encode("latin-1"))
    [problem] = errors(path)
    assert "not UTF-8" in problem.message and problem.line == 9


def test_missing_file_is_a_problem_not_an_exception(tmp_path):
    [problem] = errors(tmp_path / "nope.yaml")
    assert "cannot read the file" in problem.message


def test_read_issue_raises_one_error_with_all_problems(write_issue):
    path = write_issue("subject: x\n")
    with pytest.raises(IssueError) as caught:
        read_issue(path)
    assert len(caught.value.problems) == 2  # date and lead


def test_nothing_the_file_holds_raises(tmp_path):
    # Every line of the example deleted, doubled or cut in half: always a result, never a crash.
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)
    variants = []
    for i in range(len(lines)):
        variants.append(lines[:i] + lines[i + 1:])
        variants.append(lines[:i] + [lines[i], lines[i]] + lines[i + 1:])
        variants.append(lines[:i] + [lines[i][: len(lines[i]) // 2] + "\n"] + lines[i + 1:])
    variants += [["\x00\x01\x02"], ["key: value: other\n"], ["? [a, b]\n: c\n"], ["!!python/object:os.system x\n"],
                 ["lead: !!binary aGVsbG8=\n"], ["{" * 200 + "\n"], ["subject: \ud7ff\ufeff\n"]]
    path = tmp_path / "variant.yaml"
    for variant in variants:
        path.write_text("".join(variant), encoding="utf-8", errors="surrogatepass")
        result = load_issue(path)
        assert result.issue is not None or result.errors


def test_parse_date_helper():
    assert parse_date("June 24, 2021") == (dt.date(2021, 6, 24), None)
    assert parse_date("2021-6-24")[0] == dt.date(2021, 6, 24)
    assert parse_date("June 31, 2021")[0] is None


@pytest.mark.parametrize("name", ["my issue.yaml", "café-news.yaml", ".hidden.yaml", "-dash.yaml", "a%2F.yaml"])
def test_a_file_name_that_cannot_name_the_issue_is_refused_with_a_suggestion(tmp_path, name):
    from newsletter.reader import load_issue

    path = tmp_path / name
    path.write_text(MINIMAL, encoding="utf-8")
    result = load_issue(path)
    assert result.issue is None
    [problem] = result.errors
    assert problem.path == str(path) and "cannot name the issue's web page, Message-ID and folder" in str(problem)
    suggestion = str(problem).rsplit("for example ", 1)[1]
    from newsletter.checks import issue_name_problem
    assert issue_name_problem(suggestion) is None


def test_the_cli_check_names_the_bad_file_name(tmp_path):
    path = tmp_path / "Weekly news №3.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    run = run_cli("check", path)
    assert run.returncode == 1 and "for example weekly-news-no3" in run.stderr
