"""The built email meets what a good newsletter message is (DESIGN.md), and the plain-text
twin reads well. Static checks on the HTML; how it looks in a browser is test_look.py."""

import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
from lxml import html as lxml_html

from conftest import EXAMPLE, MINIMAL, ROOT
from newsletter.errors import TemplateError
from newsletter.model import Markdown
from newsletter.reader import read_issue
from newsletter.render import PLACEHOLDERS, Renderer, size_problems

UNSUBSCRIBE = PLACEHOLDERS["unsubscribe_url"]
LAYOUT_FONT_ZERO = "0px"  # MJML sets font-size:0 on layout cells to kill inline-block gaps


def tree(html):
    return lxml_html.document_fromstring(html)


def visible_text_elements(doc):
    """Elements with their own non-blank text, outside <head> and the hidden preheader."""
    body = doc.body
    for el in body.iter():
        if not isinstance(el.tag, str) or el.tag in ("style", "script"):
            continue
        if any("preheader" in (a.get("class") or "") for a in [el, *el.iterancestors()]):
            continue
        own = (el.text or "") + "".join(child.tail or "" for child in el)
        if own.strip():
            yield el


def effective_font_size(el):
    for node in [el, *el.iterancestors()]:
        m = re.search(r"font-size:\s*(\d+(?:\.\d+)?)px", node.get("style") or "")
        if m:
            return float(m.group(1))
    return None


# -- the HTML email -----------------------------------------------------------------------------

def test_document_basics(example):
    html = example.html
    assert html.startswith("<!DOCTYPE html>\n<html")
    doc = tree(html)
    assert doc.get("lang") == "en"
    assert doc.findtext(".//title") == example.issue.subject
    assert len(html.encode()) < 60 * 1024
    assert "data-premailer" not in html and "email-only" not in html


def test_hidden_preheader_comes_first_in_the_body(example):
    body = tree(example.html).body
    first = next(el for el in body.iter() if (el.text or "").strip())
    assert "display:none" in first.get("style").replace(" ", "")
    assert first.text_content().startswith(example.issue.preheader)


def test_dark_mode_and_mobile_rules_survive_inlining(example):
    doc = tree(example.html)
    metas = {m.get("name"): m.get("content") for m in doc.iter("meta")}
    assert metas["color-scheme"] == "light dark"
    assert metas["supported-color-schemes"] == "light dark"
    css = "".join(s.text or "" for s in doc.iter("style"))
    assert "@media (prefers-color-scheme: dark)" in css
    assert re.search(r"@media only screen and \(max-width: ?480px\)", css)
    assert "!important" in css  # premailer must not strip it


def test_text_is_at_least_14px(example):
    doc = tree(example.html)
    sizes = {}
    for el in visible_text_elements(doc):
        sizes[el.text_content().strip()[:30]] = effective_font_size(el)
    assert sizes, "no text found"
    too_small = {text: size for text, size in sizes.items() if size is None or size < 14}
    assert too_small == {}
    assert sizes[example.issue.lead.body.text[:30]] >= 16  # body copy reads comfortably


def test_layout_tables_are_presentational(example):
    tables = tree(example.html).findall(".//table")
    assert tables and all(t.get("role") == "presentation" for t in tables)


def test_mso_conditional_comments_are_kept(example):
    assert "<!--[if mso | IE]>" in example.html
    assert "<!--[if mso]>" in example.html


def test_every_link_is_absolute_or_the_unsubscribe_placeholder(example):
    hrefs = [a.get("href") for a in tree(example.html).iter("a")]
    assert hrefs
    for href in hrefs:
        assert href == UNSUBSCRIBE or re.match(r"https://[^/\s]+", href), href


def test_content_and_footer(example):
    doc = tree(example.html)
    text = " ".join(doc.body.text_content().split())
    issue = example.issue
    for piece in ("The Watchman Brief", "Issue 1 · August 13, 2021", issue.lead.source, issue.lead.title,
                  "Read more", issue.lead.quote.text, issue.commentary.title, "Revelation 16:12",
                  "Related reading", "VOA News · February 9, 2021", "Unsubscribe", "View in your browser",
                  "PO Box 1024, Springfield, IL 62701, USA"):
        assert piece in text, piece
    links = {a.text_content().strip(): a.get("href") for a in doc.iter("a")}
    assert links["Read more"] == issue.lead.url
    assert links["Unsubscribe"] == UNSUBSCRIBE
    assert links["View in your browser"] == "https://watchman.example/issues/2021-08-13-china-taliban/"
    for link in issue.related:
        assert links[link.title] == link.url


def test_commentary_block_quote_is_styled_with_its_citation(example):
    doc = tree(example.html)
    [quote] = doc.iter("blockquote")
    assert "italic" in quote.get("style")
    cite = quote.find_class("cite")[0]
    assert cite.text_content() == "— Revelation 16:12" and "normal" in cite.get("style")


def test_button_is_bulletproof(example):
    # MJML's button: a table cell with the colour, so it shows with images off and in Outlook.
    doc = tree(example.html)
    [button] = [a for a in doc.iter("a") if a.text_content().strip() == "Read more"]
    cell = next(button.iterancestors("td"))
    assert "background:#9f1d20" in (cell.get("style") or "").replace(" ", "") or cell.get("bgcolor") == "#9f1d20"


def test_images_get_alt_and_pixel_width(renderer, write_issue, config):
    path = write_issue(MINIMAL + "  image: {url: 'https://example.com/map.png', alt: A map of the region, width: 300}\n")
    with_logo = Renderer(replace(config, design=replace(config.design, logo_url="https://example.com/logo.png")))
    html = with_logo.render(read_issue(path)).html
    images = list(tree(html).iter("img"))
    assert len(images) == 2
    for img in images:
        assert img.get("alt")
        assert re.fullmatch(r"\d+", img.get("width") or ""), img.get("width")
    assert {img.get("alt"): img.get("width") for img in images} == {"A map of the region": "300",
                                                                     "The Watchman Brief": "160"}


def test_everything_from_the_author_is_escaped(renderer, write_issue):
    path = write_issue(MINIMAL.replace("Something happened", "<script>alert(1)</script> & \"q\"")
                       .replace("First paragraph.", "Raw <img src=x onerror=alert(1)> and <b>bold</b>."))
    html = renderer.render(read_issue(path)).html
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>bold" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_unsafe_markdown_links_are_never_rendered_even_unchecked(renderer, write_issue):
    issue = read_issue(write_issue(MINIMAL))
    body = Markdown("[click](javascript:alert(1)) [ok](https://example.com/ok) <javascript:alert(2)>")
    html = renderer.render(replace(issue, lead=replace(issue.lead, body=body))).html
    hrefs = [a.get("href") for a in tree(html).iter("a")]
    assert "https://example.com/ok" in hrefs
    assert not [h for h in hrefs if h and not h.startswith("https://") and h != UNSUBSCRIBE]
    assert "javascript:alert(1)" not in html  # the link is dropped, its text kept


def test_same_input_gives_byte_identical_output(tmp_path):
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-m", "newsletter", "build", str(EXAMPLE), "--out", str(out)],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        outs.append({p.name: p.read_bytes() for p in (out / EXAMPLE.stem).iterdir()})
    assert set(outs[0]) == {"email.html", "email.txt", "index.html"}
    assert outs[0] == outs[1]


def test_web_page_drops_what_only_belongs_in_an_inbox(example):
    web = example.web_html
    assert UNSUBSCRIBE not in web and "View in your browser" not in web and "View this issue" not in web
    assert "preheader" not in web and "email-only" not in web
    assert example.issue.lead.title in web and "PO Box 1024" in web
    assert tree(web).get("lang") == "en"


def test_size_warning_near_gmail_clipping(renderer, write_issue):
    big = "\n\n".join(f"    Paragraph {i} " + "with quite a lot of words in it " * 12 for i in range(260))
    path = write_issue(MINIMAL.replace("    First paragraph.\n", big + "\n"))
    rendered = renderer.render(read_issue(path))
    [warning] = size_problems(rendered)
    assert not warning.is_error and "Gmail" in warning.message
    assert rendered.html_bytes >= 90 * 1024
    assert size_problems(renderer.render(read_issue(EXAMPLE))) == []


# -- the plain-text twin -----------------------------------------------------------------------

def test_plain_text_is_readable_at_78_columns(example):
    for line in example.text.splitlines():
        if len(line) > 78:  # only a URL may run long, and it is never broken
            assert re.fullmatch(r"\s*\S*https?://\S+", line), line


def test_plain_text_writes_every_url_out_whole(example):
    text = example.text
    issue = example.issue
    for url in [issue.lead.url, example.web_url, *(link.url for link in issue.related)]:
        assert re.search(rf"(?m)^\s*{re.escape(url)}$", text), url
    assert f"Unsubscribe:\n{UNSUBSCRIBE}\n" in text


def test_plain_text_marks_quotes(example):
    text = example.text
    assert "  “If the Taliban claim" in text and "  — Jen Psaki, White House spokeswoman" in text
    assert "> “Then the sixth angel poured out his bowl" in text
    assert ">\n> — Revelation 16:12" in text


def test_plain_text_contains_everything(example):
    flat = " ".join(example.text.split())
    issue = example.issue
    for piece in ("THE WATCHMAN BRIEF", "Issue 1 · August 13, 2021", "U.S. NEWS", issue.lead.title, "Read more:",
                  "OPINION", issue.commentary.title, "RELATED READING", "ADL · June 24, 2021",
                  "PO Box 1024, Springfield, IL 62701, USA", issue.related[2].title):
        assert piece in flat, piece
    assert "<" not in example.text.replace("<b>", "")  # no HTML leaked into the text part


def test_markdown_links_become_text_with_url(renderer, write_issue):
    path = write_issue(MINIMAL.replace("First paragraph.", "See [the report](https://example.com/report) and "
                                       "<https://example.com/auto>, *really*."))
    text = " ".join(renderer.render(read_issue(path)).text.split())
    assert "See the report (https://example.com/report) and https://example.com/auto, _really_." in text


# -- templates ---------------------------------------------------------------------------------

def _custom_templates(tmp_path, config, name, edit):
    folder = tmp_path / "templates"
    folder.mkdir()
    for f in (ROOT / "templates").iterdir():
        (folder / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / name).write_text(edit((folder / name).read_text(encoding="utf-8")), encoding="utf-8")
    return Renderer(replace(config, design=replace(config.design, templates=folder)))


def test_undefined_names_in_templates_are_errors_with_their_line(tmp_path, config):
    renderer = _custom_templates(tmp_path, config, "email.txt", lambda t: t + "{{ issue.no_such_field }}\n")
    with pytest.raises(TemplateError, match=r"email\.txt:\d+: .*no_such_field"):
        renderer.render(read_issue(EXAMPLE))


def test_template_syntax_errors_name_file_and_line(tmp_path, config):
    renderer = _custom_templates(tmp_path, config, "email.mjml", lambda t: t.replace("{% endif %}", "{% endiff %}", 1))
    with pytest.raises(TemplateError, match=r"email\.mjml:\d+: template syntax error"):
        renderer.render(read_issue(EXAMPLE))


# -- no-break spaces in the plain text ----------------------------------------------------------

NBSP = "\u00a0"


def test_wrap_never_breaks_at_or_drops_a_no_break_space():
    from newsletter.markdown import wrap, words
    assert words(f"10{NBSP}000 km\t{NBSP}x\u2028y\u202fz") == [f"10{NBSP}000", "km", f"{NBSP}x", "y\u202fz"]
    for k in range(60, 80):  # the joined words on both sides of column 78
        text = "a" * k + f" 10{NBSP}000{NBSP}km and back"
        lines = wrap(text, 78)
        assert " ".join(lines) == text
        assert sum(f"10{NBSP}000{NBSP}km" in line for line in lines) == 1, lines
        assert not any(line.startswith(NBSP) or line.endswith(NBSP) for line in lines), lines
    # other white space still collapses and breaks as before
    assert wrap("one  two\n three\tfour", 78) == ["one two three four"]
    assert wrap("aaaa bbbb cccc", 20, "> ") == ["> aaaa bbbb cccc"]


def test_markdown_text_keeps_no_break_spaces_and_entities():
    from newsletter.markdown import parse, to_text
    text = to_text(parse("It is " + "far " * 16 + "10&nbsp;000&nbsp;km " + f"or 6{NBSP}214{NBSP}miles away."))
    assert f"10{NBSP}000{NBSP}km" in text and f"6{NBSP}214{NBSP}miles" in text
    assert not re.search(f"{NBSP}\n|\n{NBSP}", text)
    assert [len(line) <= 78 for line in text.splitlines()] == [True, True]


def test_a_template_cache_that_cannot_be_written_is_no_reason_to_fail(tmp_path):
    """Another user's cache folder (or a full disk): the template is compiled instead."""
    import jinja2
    from newsletter.render import _BytecodeCache
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    env = jinja2.Environment(loader=jinja2.DictLoader({"t": "Hello {{ name }}"}),
                             bytecode_cache=_BytecodeCache(str(not_a_folder)))
    assert env.get_template("t").render(name="reader") == "Hello reader"
