"""newsletter.toml: defaults, environment overrides, and every problem reported by key."""

import pytest

from conftest import ROOT
from newsletter.colors import contrast, palette
from newsletter.config import load_config
from newsletter.errors import ConfigError

GOOD = """\
[publication]
name = "Test Weekly"
base_url = "https://test.example/issues/"
postal_address = "1 Main St, Springfield"

[sender]
address = "news@test.example"
"""


def write(tmp_path, text):
    path = tmp_path / "newsletter.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_repository_settings_load():
    config = load_config(ROOT / "newsletter.toml", environ={})
    assert config.publication.name == "The Watchman Brief"
    assert config.design.templates == (ROOT / "templates").resolve()


def test_defaults_fill_in_what_is_optional(tmp_path):
    config = load_config(write(tmp_path, GOOD), environ={})
    assert config.publication.base_url == "https://test.example/issues"  # trailing slash dropped
    assert config.publication.language == "en"
    assert config.publication.why == "You are receiving this because you subscribed to Test Weekly."
    assert config.sender.name == "Test Weekly" and config.sender.reply_to is None
    assert config.design.accent_color == "#b4232a"
    assert config.design.templates == (tmp_path / "templates").resolve()


def test_environment_overrides_every_setting(tmp_path):
    config = load_config(write(tmp_path, GOOD), environ={
        "NEWSLETTER_PUBLICATION_NAME": "From Env",
        "NEWSLETTER_DESIGN_ACCENT_COLOR": "#0B5",
        "NEWSLETTER_DESIGN_LOGO_WIDTH": "200",
        "NEWSLETTER_SECRET": "not a setting of this file, ignored",
    })
    assert config.publication.name == "From Env"
    assert config.design.accent_color == "#00bb55"
    assert config.design.logo_width == 200


def test_every_problem_is_reported_by_key(tmp_path):
    path = write(tmp_path, """\
        [publication]
        name = "X"
        base_url = "javascript:alert(1)"
        languag = "en"

        [sender]
        address = "not an address"

        [desing]
        accent_color = "red"
        """.replace("        ", ""))
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"NEWSLETTER_DESIGN_LOGO_WIDTH": "huge", "NEWSLETTER_SENDER_NAMME": "x"})
    messages = "\n".join(caught.value.messages)
    assert f"{path}: publication.base_url: expected an absolute https URL" in messages
    assert f"{path}: publication.languag: unknown setting; did you mean 'language'?" in messages
    assert f"{path}: publication.postal_address: required setting is missing" in messages
    assert f"{path}: sender.address: expected an email address" in messages
    assert f"{path}: [desing]: unknown section; did you mean 'design'?" in messages
    assert "NEWSLETTER_DESIGN_LOGO_WIDTH: expected a whole number, got 'huge'" in messages
    assert "NEWSLETTER_SENDER_NAMME: unknown setting sender.namme; did you mean 'name'?" in messages
    assert len(caught.value.messages) == 7


def test_a_number_of_seconds_that_is_not_a_number_is_refused(tmp_path):
    """A "nan" passed float() and `value < 0`: a deferral's next try became NaN, which SQLite
    refused as NULL in the middle of the send (the row left in flight, reported uncertain
    though never sent). An infinite wait is a wait: it stays allowed."""
    with pytest.raises(ConfigError, match="NEWSLETTER_SEND_RETRY_DELAY: expected a number of seconds, got nan"):
        load_config(write(tmp_path, GOOD), environ={"NEWSLETTER_SEND_RETRY_DELAY": "nan"})
    assert load_config(write(tmp_path, GOOD), environ={"NEWSLETTER_SEND_MAX_WAIT": "inf"}).send.max_wait == float("inf")


def test_header_injection_through_settings_is_refused(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD), environ={"NEWSLETTER_SENDER_NAME": "Evil\r\nBcc: all@example.com"})
    assert "NEWSLETTER_SENDER_NAME: must be one line" in str(caught.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[publication\nname = 1"), environ={})


def test_accent_colours_are_adjusted_for_contrast():
    for accent in ("#ffd700", "#b4232a", "#00bb55", "#0b5cad", "#111111", "#ffffff"):
        colors = palette(accent)
        assert contrast(colors.link, "#ffffff") >= 4.5
        assert contrast(colors.dark_link, "#1e1e1e") >= 4.5
        assert contrast(colors.on_accent, accent) >= 4.5
    assert palette("#0b5cad").link == "#0b5cad"  # already readable: left alone


def test_button_text_is_readable_on_any_accent():
    grid = range(0, 256, 51)
    for r in grid:
        for g in grid:
            for b in grid:
                accent = f"#{r:02x}{g:02x}{b:02x}"
                assert contrast(palette(accent).on_accent, accent) >= 4.5, accent


@pytest.mark.parametrize("url", ["http://test.example/u/{token}", "ftp://test.example/u/{token}"])
def test_unsubscribe_url_must_be_https(tmp_path, url):
    # RFC 8058: mailbox providers make the one-click POST only to an https URL.
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD), environ={"NEWSLETTER_PUBLICATION_UNSUBSCRIBE_URL": url})
    assert f"NEWSLETTER_PUBLICATION_UNSUBSCRIBE_URL: expected an absolute https URL, got {url!r}" in str(caught.value)
    good = load_config(write(tmp_path, GOOD), environ={
        "NEWSLETTER_PUBLICATION_UNSUBSCRIBE_URL": "https://test.example/u/{token}"})
    assert good.publication.unsubscribe_url == "https://test.example/u/{token}"


@pytest.mark.parametrize("url", ["http://api.example.com", "http://10.0.0.5:8080", "http://127.0.0.1.example.com",
                                 "http://[::2]:80"])
def test_api_base_url_in_plain_http_only_to_loopback(tmp_path, url):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD), environ={"NEWSLETTER_POSTMARK_BASE_URL": url})
    assert f"NEWSLETTER_POSTMARK_BASE_URL: expected an https URL, got {url!r}: plain http would send the API key" \
        in str(caught.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8025", "http://127.8.9.10", "http://localhost:3000",
                                 "http://[::1]:8080", "https://api.example.com"])
def test_api_base_url_for_a_test_server_on_loopback(tmp_path, url):
    config = load_config(write(tmp_path, GOOD), environ={"NEWSLETTER_SENDGRID_BASE_URL": url + "/"})
    assert config.apis["sendgrid"].base_url == url


def test_smtp_give_up_after(tmp_path):
    assert load_config(write(tmp_path, GOOD), environ={}).smtp.give_up_after == 120.0
    config = load_config(write(tmp_path, GOOD), environ={"NEWSLETTER_SMTP_GIVE_UP_AFTER": "2.5"})
    assert config.smtp.give_up_after == 2.5
