"""The command line, run as a user runs it: a real process, real files, exit codes."""

import os
import re
import shutil
import subprocess
import sys

from conftest import run_cli as run
from conftest import EXAMPLE, MINIMAL


def test_help_is_useful():
    top = run("--help")
    assert top.returncode == 0
    for command in ("new", "check", "build"):
        assert command in top.stdout
        sub = run(command, "--help")
        assert sub.returncode == 0 and "--config" in sub.stdout
    assert "--strict" in run("check", "--help").stdout
    assert "--out" in run("build", "--help").stdout
    assert "--title" in run("new", "--help").stdout


def test_console_script_is_installed():
    exe = shutil.which("newsletter", path=os.path.dirname(sys.executable))
    assert exe, "pip install should put a `newsletter` command next to the interpreter"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("newsletter ")


def test_check_passes_on_the_example():
    result = run("check", EXAMPLE)
    assert result.returncode == 0
    assert "ok: 0 errors, 0 warnings in 1 file" in result.stdout


def test_check_reports_every_error_as_path_line_col_field_message(project):
    bad = project / "issues" / "bad.yaml"
    bad.write_text(MINIMAL.replace("https://example.com/story", "javascript:x").replace("subject:", "subjet:"))
    result = run("check", "issues", cwd=project)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert "issues/bad.yaml:1:1: subjet: unknown key; did you mean 'subject'?" in lines
    assert "issues/bad.yaml:1:1: subject: required key is missing; expected one line of text (the email's subject line)" in lines
    assert "issues/bad.yaml:7:8: lead.url: expected an absolute http(s) URL, got 'javascript:x'" in lines
    assert lines[-1] == "check failed: 3 errors, 0 warnings in 2 files"
    for line in lines[:-1]:
        assert re.match(r"issues/bad\.yaml:\d+:\d+: [\w.\[\]]+: ", line), line


def test_warnings_fail_only_under_strict(project):
    (project / "issues" / "warn.yaml").write_text(MINIMAL.replace("https://example.com/story", "http://example.com/s"))
    relaxed = run("check", "issues/warn.yaml", cwd=project)
    assert relaxed.returncode == 0 and "warning: lead.url: plain http: link" in relaxed.stderr
    assert run("check", "--strict", "issues/warn.yaml", cwd=project).returncode == 1
    assert run("build", "--strict", "issues/warn.yaml", cwd=project).returncode == 1
    assert not (project / "dist").exists()


def test_build_writes_email_text_and_web_page(project):
    result = run("build", cwd=project)
    assert result.returncode == 0, result.stderr
    folder = project / "dist" / EXAMPLE.stem
    assert sorted(p.name for p in folder.iterdir()) == ["email.html", "email.txt", "index.html"]
    assert f"built dist/{EXAMPLE.stem}/" in result.stdout
    assert (folder / "email.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_build_with_out_folder(project, tmp_path):
    out = tmp_path / "site"
    assert run("build", "issues", "--out", out, cwd=project).returncode == 0
    assert (out / EXAMPLE.stem / "index.html").is_file()


def test_invalid_input_builds_nothing(project):
    (project / "issues" / "broken.yaml").write_text("subject: [\n")
    result = run("build", cwd=project)
    assert result.returncode == 1
    assert "issues/broken.yaml:2:1: invalid YAML" in result.stderr
    assert "nothing was written" in result.stderr
    assert not (project / "dist").exists()  # not even the valid example


def test_new_writes_a_skeleton_that_checks_clean(project):
    result = run("new", "--date", "2024-05-01", "--title", "Hello, Wörld!", cwd=project)
    assert result.returncode == 0, result.stderr
    path = project / "issues" / "2024-05-01-hello-world.yaml"
    assert result.stdout.strip() == "wrote issues/2024-05-01-hello-world.yaml"
    text = path.read_text(encoding="utf-8")
    assert 'subject: "Hello, Wörld!"' in text and "number: 2" in text  # after the example's issue 1
    checked = run("check", "--strict", path, cwd=project)
    assert checked.returncode == 0, checked.stderr
    again = run("new", "--date", "2024-05-01", "--title", "Hello, Wörld!", cwd=project)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_new_rejects_a_bad_date(project):
    result = run("new", "--date", "2024-13-01", cwd=project)
    assert result.returncode == 2 and "expected a date as YYYY-MM-DD" in result.stderr


def test_settings_problems_are_reported_not_raised(project):
    missing = run("check", cwd=project / "issues")
    assert missing.returncode == 2 and "newsletter.toml: no such file" in missing.stderr
    bad_env = run("check", cwd=project, env={"NEWSLETTER_DESIGN_ACCENT_COLOR": "reddish"})
    assert bad_env.returncode == 2
    assert "NEWSLETTER_DESIGN_ACCENT_COLOR: expected a colour as #rrggbb, got 'reddish'" in bad_env.stderr


def test_environment_overrides_reach_the_output(project):
    result = run("build", cwd=project, env={"NEWSLETTER_DESIGN_ACCENT_COLOR": "#0b5cad",
                                            "NEWSLETTER_PUBLICATION_NAME": "Env Weekly"})
    assert result.returncode == 0, result.stderr
    html = (project / "dist" / EXAMPLE.stem / "email.html").read_text(encoding="utf-8")
    assert "#0b5cad" in html and "Env Weekly" in html and "#9f1d20" not in html


def test_config_option_selects_another_file(project):
    other = project / "other.toml"
    other.write_text((project / "newsletter.toml").read_text().replace("The Watchman Brief", "Other Letter"))
    assert run("build", "--config", other, cwd=project).returncode == 0
    assert "OTHER LETTER" in (project / "dist" / EXAMPLE.stem / "email.txt").read_text(encoding="utf-8")


def test_broken_template_is_reported_with_its_line(project):
    mjml = project / "templates" / "email.mjml"
    mjml.write_text(mjml.read_text().replace("{{ issue.subject }}", "{{ issue.subject", 1))
    result = run("build", cwd=project)
    assert result.returncode == 2 and re.search(r"email\.mjml:\d+: template syntax error", result.stderr)


def test_unwritable_output_is_reported(project):
    (project / "dist").write_text("a file where the folder should be")
    result = run("build", cwd=project)
    assert result.returncode == 2 and "cannot write to dist/" in result.stderr


def test_no_issue_files(project):
    empty = project / "empty"
    empty.mkdir()
    result = run("check", "empty", cwd=project)
    assert result.returncode == 1 and "no issue files found in empty" in result.stderr
