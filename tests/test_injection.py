"""Injection: a line break or NUL in anything that reaches a header never makes a header of
its own; script URLs are refused by the reader whatever their disguise; issue names and
template paths do not reach outside their folders.

Oracle for the headers: the stdlib parser (policy=email.policy.default) reads back exactly
the headers a clean message has, and none of the injected ones.
"""

from __future__ import annotations

import email
import email.policy
import json
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLE, MINIMAL, config_for, run_cli
from newsletter.errors import ConfigError, TemplateError
from newsletter.message import MessageFactory
from newsletter.reader import load_issue
from newsletter.tokens import Signer

ADA = "ada@example.com"
BREAKS = ["\r\n", "\n", "\r", "\x00", "\u2028", "\x85", "\r\n\r\n"]
INJECTED = "Bcc: evil@example.com"


@pytest.fixture(scope="module")
def signer(config):
    return Signer(b"injection-secret", config.publication.list_id)


def headers(data: bytes) -> list[str]:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert not msg.defects
    return sorted(k.lower() for k in msg.keys())


@pytest.fixture(scope="module")
def clean_headers(example, config, signer):
    return headers(MessageFactory(example, config, signer).build(ADA, "Ada", signer.recipient_key(ADA)).data)


# Per recipient (name, merge fields in the subject) and per send (--test): Hypothesis mixes the breaks in.
injected_text = st.builds(lambda a, br, b: a + br + b, st.text(max_size=10), st.sampled_from(BREAKS),
                          st.sampled_from([INJECTED, "X-Evil: 1", " folded", ""]))


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(name=injected_text, city=injected_text, test_send=st.booleans())
def test_breaks_in_names_and_merge_fields_never_make_a_header(example, config, signer, clean_headers, name, city,
                                                             test_send):
    merged = replace(example, subject="News for {{m:0}}", merges=(("city", "there"),))
    factory = MessageFactory(merged, config, signer, test_send=test_send)
    msg = factory.build(ADA, name, signer.recipient_key(ADA), fields={"city": city})
    assert headers(msg.data) == clean_headers
    parsed = email.message_from_bytes(msg.data, policy=email.policy.default)
    assert parsed["Bcc"] is None and parsed["X-Evil"] is None
    assert "\n" not in parsed["Subject"] and "\r" not in parsed["Subject"]
    assert [a.addr_spec for a in parsed["To"].addresses] == [ADA]


SETTINGS = [("sender", "name"), ("sender", "reply_to"), ("sender", "address"), ("publication", "name"),
            ("publication", "list_id"), ("publication", "unsubscribe_url"), ("publication", "unsubscribe_mailto")]


@pytest.mark.parametrize("section,key", SETTINGS)
@pytest.mark.parametrize("brk", ["\r\n", "\n", "\x00"])
def test_breaks_in_header_settings_are_refused(example, config, signer, section, key, brk):
    value = {"name": "Watch", "reply_to": "a@example.com", "address": "a@example.com", "list_id": "a.example.com",
             "unsubscribe_url": "https://example.com/u/{token}", "unsubscribe_mailto": "u@example.com"}[key]
    evil = value + brk + INJECTED
    # where settings come from: the environment (and the file, by the same checks)
    with pytest.raises(ConfigError, match=f"NEWSLETTER_{section.upper()}_{key.upper()}: "):
        config_for({f"NEWSLETTER_{section.upper()}_{key.upper()}": evil})
    # and a Config built by other code is checked again before any header is made
    bad = replace(config, **{section: replace(getattr(config, section), **{key: evil})})
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: "):
        MessageFactory(example, bad, signer)


@pytest.mark.parametrize("address", ["ada@example.com\r\nBcc: evil@example.com", "ada@example.com\nX: y",
                                     "ada@example.com\u2028X: y", "Ada <ada@example.com>"])
def test_test_addresses_with_breaks_are_refused(project, address):
    result = run_cli("send", "issues/" + EXAMPLE.name, "--test", address, cwd=project)
    assert result.returncode == 2 and "--test" in result.stderr
    assert not (project / "outbox").exists() or not any((project / "outbox").rglob("*.eml"))


# -- script URLs -----------------------------------------------------------------------------------

SCRIPT_URLS = ["javascript:alert(1)", "JAVASCRIPT:alert(1)", "JaVaScRiPt:alert(1)", " javascript:alert(1)",
               "\tjavascript:alert(1)", "java\tscript:alert(1)", "java\nscript:alert(1)", "javascript\x01:alert(1)",
               "\x00javascript:alert(1)", "&#106;avascript:alert(1)", "&#x6A;avascript:alert(1)",
               "javascript&colon;alert(1)", "java%0ascript:alert(1)", "data:text/html,<script>alert(1)</script>",
               "DATA:text/html;base64,PHNjcmlwdD4=", "vbscript:msgbox(1)", "VBScript:msgbox(1)",
               "\u200bjavascript:alert(1)", "ｊavascript:alert(1)"]


@pytest.mark.parametrize("url", SCRIPT_URLS)
@pytest.mark.parametrize("where", ["lead.url", "lead.image.url", "related[0].url", "lead.body", "related[0].summary"])
def test_script_urls_are_refused_by_the_reader_naming_the_line(write_issue, url, where):
    q = json.dumps(url)
    text = MINIMAL + ("related:\n  - source: S\n    title: T\n    url: https://example.com/r\n")
    if where == "lead.url":
        text = text.replace("url: https://example.com/story", f"url: {q}")
    elif where == "lead.image.url":
        text = text.replace("  body: |", f"  image: {{url: {q}, alt: A picture, width: 300}}\n  body: |")
    elif where == "related[0].url":
        text = text.replace("url: https://example.com/r", f"url: {q}")
    elif where == "lead.body":
        text = text.replace("    First paragraph.", "    First paragraph, [a link](" + url.replace("\n", " ").replace(
            "\x00", "") + ") and <" + url.replace("\n", "").replace(" ", "").replace("\x00", "") + ">.")
    else:
        text += f"    summary: {json.dumps('[click](' + url.replace(chr(10), '').replace(' ', '%20') + ')')}\n"
    path = write_issue(text)
    result = load_issue(path)
    if where in ("lead.body", "related[0].summary") and result.issue is not None:
        # Markdown may read a disguised one as text (no link at all); then no href may carry it.
        from newsletter import markdown
        body = result.issue.lead.body if where == "lead.body" else result.issue.related[0].summary
        for link in markdown.links(body.tokens):
            assert link.url.startswith(("http:", "https:", "mailto:")), link
        return
    assert result.issue is None
    # the field that holds it, or YAML itself when the disguise is a control character
    assert result.errors and all(p.line > 1 and p.field in (where, "") for p in result.errors), result.errors


# -- paths -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", "...", ".hidden", "a b", "x\\..\\y", "-rf", "über"])
def test_issue_names_that_could_leave_the_output_folder_are_refused(project, name):
    (project / "issues" / f"{name}.yaml").write_text(MINIMAL, encoding="utf-8")
    result = run_cli("build", f"issues/{name}.yaml", "--out", "dist", cwd=project)
    assert result.returncode == 1 and "cannot name the issue" in result.stderr
    assert not (project / "dist").exists()


def test_template_paths_cannot_leave_the_templates_folder(project, config, tmp_path):
    (tmp_path / "secret.txt").write_text("SECRET")
    email_mjml = project / "templates" / "email.mjml"
    for target in ("../../secret.txt", str(tmp_path / "secret.txt")):
        email_mjml.write_text(f'{{% include "{target}" %}}')
        result = run_cli("build", cwd=project)
        assert result.returncode == 2 and "not found" in result.stderr, result.stderr
        assert "SECRET" not in result.stdout + result.stderr


def test_the_issue_name_not_the_path_names_the_output_folder(project):
    (project / "elsewhere").mkdir()
    (project / "elsewhere" / "deep.yaml").write_text(MINIMAL, encoding="utf-8")
    result = run_cli("build", "elsewhere/deep.yaml", "--out", "dist", cwd=project)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (project / "dist").iterdir()) == ["deep"]


def test_a_symlink_planted_in_the_output_folder_is_replaced_not_followed(project, tmp_path):
    victim = tmp_path / "victim.html"
    victim.write_text("KEEP")
    (project / "dist" / "2021-08-13-china-taliban").mkdir(parents=True)
    (project / "dist" / "2021-08-13-china-taliban" / "email.html").symlink_to(victim)
    result = run_cli("build", "--out", "dist", cwd=project)
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "KEEP"
    assert not (project / "dist" / "2021-08-13-china-taliban" / "email.html").is_symlink()


def test_a_template_error_is_no_traceback(project, config):
    (project / "templates" / "email.mjml").write_text("{% include '/etc/passwd' %}")
    from newsletter.config import load_config
    from newsletter.reader import read_issue
    from newsletter.render import Renderer
    cfg = load_config(project / "newsletter.toml", environ={})
    with pytest.raises(TemplateError, match="not found"):
        Renderer(cfg).render(read_issue(project / "issues" / EXAMPLE.name))
