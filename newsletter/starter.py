"""`newsletter init`: a working newsletter folder from what ships in the package.

It writes a commented newsletter.toml, issues/ with the example issue and an example
subscriber CSV; with ``templates=True`` it also copies the packaged templates into the
folder's templates/ for editing (render.py reads the folder's templates first, file by file,
then the packaged ones, so a folder without any builds at once). Files already there are
kept, never overwritten.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from .config import CONFIG_FILE, SCHEMA, load_config
from .errors import ConfigError, OutputError
from .render import PACKAGED_TEMPLATES

STARTER = Path(__file__).resolve().parent / "starter"  # symlinks to issues/ and examples/ in the repository


@dataclass(frozen=True)
class Field:
    key: str  # the argument's name
    flag: str
    prompt: str
    option: object  # the config option that validates it, so init accepts exactly what the settings do


FIELDS = (
    Field("name", "--name", "The newsletter's name", SCHEMA["publication"]["name"]),
    Field("sender", "--sender", "Sender address (the From of every email)", SCHEMA["sender"]["address"]),
    Field("postal_address", "--postal-address", "Your postal address (anti-spam laws require it in every email)",
          SCHEMA["publication"]["postal_address"]),
    Field("base_url", "--base-url", "Where the web archive will live (https URL)", SCHEMA["publication"]["base_url"]),
)


def default_base_url(sender: str) -> str:
    return f"https://{sender.rsplit('@', 1)[1].lower()}/newsletter"


def gather(given: dict[str, str | None], ask: Callable[[str], str] | None) -> dict[str, str]:
    """The settings init needs: from the flags, else asked (when ``ask`` is given: a terminal).
    Raises ConfigError naming every flag that is missing or invalid."""
    values: dict[str, str] = {}
    problems: list[str] = []
    for f in FIELDS:
        raw = given.get(f.key)
        default = default_base_url(values["sender"]) if f.key == "base_url" and "sender" in values else None
        if raw is not None:
            try:
                values[f.key] = f.option.validate(raw)
            except ValueError as exc:
                problems.append(f"{f.flag}: {exc}")
            continue
        if ask is None:
            if default:
                values[f.key] = default
            elif f.key != "base_url":  # without a sender there is no default to offer, but the sender is named
                problems.append(f"{f.flag} is missing")
            continue
        while True:  # on a terminal: ask again until the answer is valid
            try:
                answer = ask(f"{f.prompt}" + (f" [{default}]" if default else "") + ": ").strip()
            except EOFError:  # Ctrl-D
                raise ConfigError([f"{f.flag}: no answer (end of input)"]) from None
            try:
                values[f.key] = f.option.validate(answer or default or "")
                break
            except ValueError as exc:
                print(f"  {exc}")
    if problems:
        if ask is None and any(p.endswith("is missing") for p in problems):
            problems.append("standard input is not a terminal, so nothing was asked: pass "
                            + ", ".join(f"{f.flag} ..." for f in FIELDS[:3]) + " (and --base-url URL)")
        raise ConfigError(problems)
    return values


def unsubscribe_url(base_url: str) -> str:
    return f"https://{urlsplit(base_url).netloc}/unsubscribe/{{token}}"


def _toml(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string (no controls: validated)


def config_text(values: dict[str, str]) -> str:
    return f"""\
# {values["name"]}: the newsletter's settings, written by `newsletter init`.
# Every setting can be overridden by an environment variable NEWSLETTER_<SECTION>_<KEY>,
# e.g. NEWSLETTER_SEND_BACKEND=smtp. Secrets are read only from the environment.

[publication]
name = {_toml(values["name"])}
base_url = {_toml(values["base_url"])}   # the web archive (`newsletter archive`); issue pages go below it
postal_address = {_toml(values["postal_address"])}   # in every email's footer
language = "en"
# why = "You are receiving this because you subscribed at example.com."   # the footer's first line
# One-click unsubscribe (RFC 8058), required to send: `newsletter serve` answers it wherever this points.
unsubscribe_url = {_toml(unsubscribe_url(values["base_url"]))}
# unsubscribe_mailto = "unsubscribe@example.com"

[sender]
address = {_toml(values["sender"])}
# name = "Someone at {values["name"]}"   # the From name (default: the newsletter's name)
# reply_to = "editor@example.com"

[design]
accent_color = "#b4232a"         # links, buttons and rules
# logo_url = "https://example.com/logo.png"
# logo_alt = "Our logo"
# logo_width = 160
# Your own templates, read before the packaged ones, file by file: `newsletter init --templates`
# copies the defaults here to edit; a file you delete falls back to the packaged one.
templates = "templates"

[store]
path = "newsletter.sqlite3"      # subscribers, suppressions and the send ledger

[send]
backend = "outbox"               # outbox writes .eml proofs; smtp, sendgrid, mailgun, postmark, resend or ses deliver
outbox = "outbox"
# NEWSLETTER_SECRET (environment) signs the unsubscribe links: set it before the first real send.

[smtp]
# host = "smtp.example.com"
# port = 587
# security = "starttls"          # starttls, ssl or none
# username = "newsletter"        # the password comes from NEWSLETTER_SMTP_PASSWORD
"""


@dataclass
class InitReport:
    folder: Path
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # already there: left as they were


def _copy(src: Path, dest: Path, report: InitReport) -> None:
    if dest.exists():
        report.kept.append(dest)
        return
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    report.written.append(dest)


def init_folder(folder: Path, values: dict[str, str] | None, templates: bool = False) -> InitReport:
    """Write what is missing of a newsletter folder. ``values`` may be None only when the folder
    already has its newsletter.toml (then only the templates are copied)."""
    folder = Path(folder)
    report = InitReport(folder)
    config = folder / CONFIG_FILE
    if values is not None:
        if config.exists():
            raise OutputError(f"{config} already exists; nothing was changed "
                              "(`newsletter init --templates` copies the default templates next to it)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(config, "x", encoding="utf-8") as f:
                f.write(config_text(values))
        except OSError as exc:
            raise OutputError(f"cannot write {config}: {exc.strerror or exc}") from exc
        report.written.append(config)
        load_config(config, environ={})  # what init wrote must load; a failure here is init's bug, named
        for issue in sorted((STARTER / "issues").iterdir()):
            _copy(issue, folder / "issues" / issue.name, report)
        _copy(STARTER / "subscribers.csv", folder / "subscribers.csv", report)
    elif not config.exists():
        raise OutputError(f"{config}: no such file")
    if templates:
        target = load_config(config).design.templates
        for template in sorted(PACKAGED_TEMPLATES.iterdir()):
            if template.is_file():
                _copy(template, target / template.name, report)
    return report
