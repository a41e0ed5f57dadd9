"""The look and merge-field warnings of `check`, each on its line."""

import re

from conftest import MINIMAL, run_cli
from newsletter.build import check_paths
from newsletter.colors import contrast
from newsletter.config import load_config
from newsletter.reader import load_issue


def warnings_of(path):
    return {(p.line, p.field): p.message for p in load_issue(path).problems if not p.is_error}


def test_an_image_without_a_width_and_one_on_plain_http(write_issue):
    path = write_issue(MINIMAL.replace("  body: |", "  image:\n    url: http://example.com/a.png\n"
                                                   "    alt: A chart\n  body: |"))
    found = warnings_of(path)
    assert "no width in pixels" in found[(9, "lead.image")]
    assert "plain http" in found[(9, "lead.image.url")]
    with_width = write_issue(MINIMAL.replace("  body: |", "  image:\n    url: https://example.com/a.png\n"
                                                          "    alt: A chart\n    width: 400\n  body: |"), "ok.yaml")
    assert warnings_of(with_width) == {}


def test_a_preheader_that_repeats_the_subject_or_is_missing(write_issue):
    same = write_issue(MINIMAL.replace("preheader: What this issue is about.", "preheader: A small issue!"))
    assert "repeats the subject" in warnings_of(same)[(3, "preheader")]
    longer = write_issue(MINIMAL.replace("preheader: What this issue is about.",
                                         "preheader: a SMALL issue - and more words"), "longer.yaml")
    assert "repeats the subject" in warnings_of(longer)[(3, "preheader")]
    missing = write_issue(MINIMAL.replace("preheader: What this issue is about.\n", ""), "missing.yaml")
    assert "missing" in warnings_of(missing)[(1, "preheader")]


def test_a_subject_too_long_for_phones(write_issue):
    path = write_issue(MINIMAL.replace("subject: A small issue", "subject: " + "word " * 14 + "end"))
    assert "phones show about the first 60" in warnings_of(path)[(1, "subject")]


def theme_line(project, name):
    lines = (project / "templates" / "theme.j2").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if f"set {name} =" in line)


def test_text_colours_under_aa_contrast_in_light_and_dark_mode(project):
    theme = project / "templates" / "theme.j2"
    text = theme.read_text()
    text = re.sub(r'set muted = "#[0-9a-f]{6}"', 'set muted = "#a09d98"', text)
    text = re.sub(r'set dark_muted = "#[0-9a-f]{6}"', 'set dark_muted = "#5f5d59"', text)
    theme.write_text(text)
    config = load_config(project / "newsletter.toml", environ={})
    report = check_paths([project / "issues"], config)
    found = [(p.path, p.line, p.field, p.message) for p in report.warnings]
    assert {(f, m.split(" (")[1].split(")")[0]) for _, _, f, m in found} == {
        ("muted", "dates, bylines and sources"), ("muted", "the footer"),
        ("dark_muted", "dates, bylines and sources in dark mode"), ("dark_muted", "the footer in dark mode")}
    for path, line, field, message in found:
        assert path == str(theme) and line == theme_line(project, field)
    ratio = contrast("#a09d98", "#ffffff")
    assert f"muted #a09d98 on card #ffffff (dates, bylines and sources) has contrast {ratio:.2f}:1; " \
           "WCAG AA needs 4.5:1" in [m for *_, m in found]
    # Whatever the accent, its links and button pass: only the two edited colours are reported.
    for accent in ("#9f1d20", "#ffff00", "#777777", "#0000ff"):
        (project / "newsletter.toml").write_text(re.sub(r'accent_color = "#[0-9a-f]{6}"', f'accent_color = "{accent}"',
                                                        (project / "newsletter.toml").read_text()))
        ok = check_paths([project / "issues"], load_config(project / "newsletter.toml", environ={}))
        assert {p.field for p in ok.warnings} == {"muted", "dark_muted"}


MERGE_ISSUE = MINIMAL.replace("subject: A small issue", "subject: News for {{city|your town}}, {{Name|friend}}")


def test_a_merge_field_no_subscriber_has(project):
    from newsletter.recipients import Recipient
    from newsletter.store import Store

    issue = project / "issues" / "merge.yaml"
    issue.write_text(MERGE_ISSUE)
    mjml = project / "templates" / "email.mjml"
    source = mjml.read_text().replace('Hi {{ subscriber.name | default("there") }},',
                                      'Hi {{ subscriber.name | default("there") }}, {{ subscriber.plan | default("") }}')
    mjml.write_text(source)
    plan_line = next(i for i, line in enumerate(source.splitlines(), 1) if "subscriber.plan" in line)
    with Store(project / "newsletter.sqlite3") as store:
        store.add(Recipient("a@example.com", "Ann", {"country": "NZ"}), "test")
    result = run_cli("check", issue, cwd=project)
    assert result.returncode == 0, result.stderr
    assert (f"{issue}:1:10: warning: subject: merge field 'city': no subscriber in the store has it; "
            "every reader gets the fallback 'your town'") in result.stderr
    assert (f"{mjml}:{plan_line}:1: warning: subscriber.plan: merge field 'plan': no subscriber in the store "
            "has it; every reader gets nothing there") in result.stderr
    assert "'Name'" not in result.stderr  # name and email: every subscriber has them
    # A list that has both fields: nothing to say.
    csv = project / "list.csv"
    csv.write_text("email,name,City,plan\nb@example.com,Bo,Oslo,pro\n")
    listed = run_cli("check", "--list", csv, issue, cwd=project)
    assert listed.returncode == 0 and "merge field" not in listed.stderr
    # A list without them, under --strict, fails.
    bare = project / "bare.csv"
    bare.write_text("email,name,city\nb@example.com,Bo,\n")  # a column nobody fills in is no field
    strict = run_cli("check", "--strict", "--list", bare, issue, cwd=project)
    assert strict.returncode == 1 and f"no subscriber in {bare} has it" in strict.stderr
    missing = run_cli("check", "--list", project / "nope.csv", issue, cwd=project)
    assert missing.returncode == 2 and "nope.csv: cannot read it" in missing.stderr


def test_no_store_says_nothing_about_merge_fields(project):
    issue = project / "issues" / "merge.yaml"
    issue.write_text(MERGE_ISSUE)
    result = run_cli("check", issue, cwd=project)
    assert result.returncode == 0 and "merge field" not in result.stderr
