"""How the built email looks in real headless Chromium: no sideways scrolling and readable
text on a phone, a column of at most 600 px on a desktop, readable contrast in light and
dark mode, and screenshots to look at (tests/artifacts/screenshots/, git-ignored).

The page is conftest.py's `example` (issues/2021-08-13-china-taliban.yaml, rendered once).
All measuring happens in two Chromium runs (light, dark) shared by the module; see
tests/browser.py for how the viewport and dark mode are set.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import browser  # tests/browser.py (pytest puts tests/ on sys.path)

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "tests" / "artifacts" / "screenshots"

LEAD_TITLE = "China Prepared to Recognize Taliban Control of Afghanistan"
LEAD_BODY = "China is prepared to recognize the Taliban"  # the lead story's first paragraph

PHONE = 375
DESKTOP = 800
MIN_FONT_PX = 14
COLUMN_MAX = 600
AA = 4.5  # WCAG AA, normal text
AA_LARGE = 3.0  # WCAG AA, text of 24 px, or 18.66 px bold


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    """Skips these tests when there is no Chromium; fails them under CI=true (the rest of the
    suite still runs)."""
    return browser.chromium_path()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("look")


@pytest.fixture(scope="module")
def light(chromium, example, workdir):
    """Light-mode measurements: the email on a phone and a desktop, the web page on a phone."""
    return browser.measure(chromium, {
        "phone": browser.Page(example.html, PHONE),
        "desktop": browser.Page(example.html, DESKTOP),
        "web": browser.Page(example.web_html, PHONE),
    }, workdir)


@pytest.fixture(scope="module")
def dark(chromium, example, workdir):
    """The same, with prefers-color-scheme: dark."""
    return browser.measure(chromium, {
        "phone": browser.Page(example.html, PHONE),
        "desktop": browser.Page(example.html, DESKTOP),
    }, workdir, dark=True)


@pytest.fixture(scope="module")
def screenshots(chromium, example, light, dark, workdir):
    """Full-page PNGs: name -> (path, requested width, requested height)."""
    shots = {
        "desktop": (example.html, DESKTOP, light["desktop"]["scrollHeight"], False),
        "phone": (example.html, PHONE, light["phone"]["scrollHeight"], False),
        "dark": (example.html, PHONE, dark["phone"]["scrollHeight"], True),
    }
    taken = {}
    for name, (page, width, height, is_dark) in shots.items():
        path = browser.screenshot(chromium, page, SCREENSHOTS / f"{name}.png", width, height, workdir, dark=is_dark)
        taken[name] = (path, width, height)
    return taken


# --- helpers --------------------------------------------------------------------------


def text_item(measured: dict, starts: str) -> dict:
    """The measured text element whose text starts with `starts`."""
    for item in measured["texts"]:
        if item["text"].startswith(starts):
            return item
    raise AssertionError(f"no visible text starting {starts!r} was measured; "
                         f"found {[t['text'][:40] for t in measured['texts']][:20]}")


def lead_card(measured: dict) -> dict:
    """The .card box holding the lead story's title."""
    title = text_item(measured, LEAD_TITLE)
    assert title["card"] >= 0, f"the lead title is in no .card element: {title}"
    return measured["cards"][title["card"]]


def large(item: dict) -> bool:
    return item["fontSize"] >= 24 or (item["fontSize"] >= 18.66 and item["fontWeight"] >= 700)


def describe(item: dict) -> str:
    return f"<{item['element']}> {item['fontSize']}px {item['text'][:50]!r}"


def assert_viewport(measured: dict, width: int) -> None:
    assert measured["innerWidth"] == width, (
        f"measured in a {measured['innerWidth']} px viewport, not {width} px: the numbers below are for the wrong width")
    assert measured["clientWidth"] == width, f"clientWidth {measured['clientWidth']} (a scrollbar?)"
    assert measured["narrow"] is (width <= 480), "the email's max-width: 480px media query did not see the viewport"


# --- phone ----------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["phone", "web"])
def test_phone_does_not_scroll_sideways(light, page):
    """The email (and the web-archive page) at 375 px: nothing wider than the screen."""
    measured = light[page]
    assert_viewport(measured, PHONE)
    assert measured["scrollWidth"] <= PHONE, (
        f"{page}: document scrollWidth is {measured['scrollWidth']} px at a {PHONE} px viewport; "
        f"sticking out: {measured['overflowing']}")


def test_phone_text_is_at_least_14px(light):
    measured = light["phone"]
    assert_viewport(measured, PHONE)
    texts = measured["texts"]
    # The measurement saw the real email, not an empty or error page.
    text_item(measured, LEAD_TITLE)
    text_item(measured, LEAD_BODY)
    assert not any(t["text"].startswith("Beijing prepares") for t in texts), "the hidden preheader was measured"
    too_small = [describe(t) for t in texts if t["fontSize"] < MIN_FONT_PX]
    assert not too_small, f"text under {MIN_FONT_PX}px at {PHONE} px wide: {too_small}"


# --- desktop --------------------------------------------------------------------------


def test_desktop_column_is_at_most_600px_and_centered(light):
    measured = light["desktop"]
    assert_viewport(measured, DESKTOP)
    card = lead_card(measured)
    assert 400 < card["width"] <= COLUMN_MAX, f"the lead story's card is {card['width']} px wide at {DESKTOP} px"
    left_gap, right_gap = card["left"], DESKTOP - card["right"]
    assert abs(left_gap - right_gap) <= 2, f"the card is off centre: {left_gap} px left, {right_gap} px right"
    too_wide = [c for c in measured["cards"] if c["visible"] and c["width"] > COLUMN_MAX]
    assert not too_wide, f"cards wider than {COLUMN_MAX} px: {too_wide}"
    assert measured["scrollWidth"] <= DESKTOP


# --- colour ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("page", ["phone", "desktop"])
def test_body_text_contrast(light, dark, scheme, page):
    """The lead story's body text on its card: WCAG AA in both colour schemes; in dark mode
    the card is dark and the text light."""
    measured = (dark if scheme == "dark" else light)[page]
    assert measured["dark"] is (scheme == "dark"), (
        f"matchMedia('(prefers-color-scheme: dark)') is {measured['dark']} in the {scheme} run")
    body = text_item(measured, LEAD_BODY)
    card = lead_card(measured)
    assert body["card"] == text_item(measured, LEAD_TITLE)["card"]
    assert body["color"] is not None, f"unparsed text colour {body['rawColor']!r}"
    text_l, card_l = browser.luminance(body["color"]), browser.luminance(card["background"])
    if scheme == "dark":
        assert card_l < 0.05, f"dark mode: the card is not dark: rgb{tuple(card['background'])}, luminance {card_l:.3f}"
        assert text_l > 0.5, f"dark mode: the body text is not light: rgb{tuple(body['color'])}, luminance {text_l:.3f}"
    else:
        assert card_l > 0.8, f"light mode: the card is not light: rgb{tuple(card['background'])}"
        assert text_l < 0.05, f"light mode: the body text is not dark: rgb{tuple(body['color'])}"
    on_card = browser.contrast(body["color"], card["background"])
    assert on_card >= AA, f"{scheme}: body text on the card has contrast {on_card:.2f}, under {AA}"
    behind = browser.contrast(body["color"], body["background"])
    assert behind >= AA, f"{scheme}: body text on what is behind it has contrast {behind:.2f}, under {AA}"


def poor_contrast(measured: dict) -> list[str]:
    """Visible text under WCAG AA on whatever is behind it: 4.5:1, or 3:1 for large text."""
    poor = []
    for item in measured["texts"]:
        assert item["color"] is not None, f"unparsed text colour {item['rawColor']!r}: {describe(item)}"
        ratio = browser.contrast(item["color"], item["background"])
        if ratio < (AA_LARGE if large(item) else AA):
            poor.append(f"{describe(item)}: rgb{tuple(round(c) for c in item['color'])} on "
                        f"rgb{tuple(round(c) for c in item['background'])} = {ratio:.2f}")
    return poor


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("page", ["phone", "desktop"])
def test_all_text_meets_wcag_aa(light, dark, scheme, page):
    """Every visible text element, not just the body text (e.g. the masthead, which once
    stayed #1f1f1f on the #1e1e1e card in dark mode)."""
    measured = (dark if scheme == "dark" else light)[page]
    assert measured["dark"] is (scheme == "dark")
    poor = poor_contrast(measured)
    assert not poor, f"{scheme}, {page}: text under WCAG AA contrast: {poor}"


# --- screenshots ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["desktop", "phone", "dark"])
def test_screenshot(screenshots, name):
    path, width, height = screenshots[name]
    assert path.is_file(), f"no screenshot at {path}"
    assert browser.png_size(path) == (width, height), f"{path} is not {width} x {height} (full page)"
    assert height > 1000, f"{name}: a page of only {height} px is not the whole issue"
    assert path.stat().st_size > 20_000, f"{path} is only {path.stat().st_size} bytes: blank?"


# --- the checks themselves ------------------------------------------------------------


def test_measurements_catch_broken_pages(chromium, example, workdir):
    """The same measuring, fed deliberately broken copies of the email, reports them: a
    900 px table scrolls sideways, a 10 px span is small text (while the hidden preheader
    is still not counted), and light grey text on white is poor contrast."""
    wide_table = '<table style="width:900px"><tr><td>A table too wide for a phone</td></tr></table>'
    wide = example.html.replace("</body>", wide_table + "</body>", 1)
    tiny = example.html.replace(LEAD_BODY, f'<span style="font-size:10px">{LEAD_BODY}</span>', 1)
    faint = example.html.replace(LEAD_BODY, f'<span style="color:#bbbbbb">{LEAD_BODY}</span>', 1)
    assert example.html not in (wide, tiny, faint)
    measured = browser.measure(chromium, {
        "wide": browser.Page(wide, PHONE),
        "tiny": browser.Page(tiny, PHONE),
        "faint": browser.Page(faint, PHONE),
    }, workdir)

    assert measured["wide"]["innerWidth"] == PHONE
    assert measured["wide"]["scrollWidth"] >= 900
    assert any(o["element"] == "table" for o in measured["wide"]["overflowing"])

    small = [t for t in measured["tiny"]["texts"] if t["fontSize"] < MIN_FONT_PX]
    assert [(t["element"], t["fontSize"], t["text"]) for t in small] == [("span", 10, LEAD_BODY)]

    poor = poor_contrast(measured["faint"])
    assert len(poor) == 1 and LEAD_BODY[:30] in poor[0], poor
