"""newsletter.toml: the newsletter's own settings, with NEWSLETTER_<SECTION>_<KEY> overrides.

Each setting is a small option object (the mkdocs pattern) whose ``validate`` returns the
clean value or raises ValueError saying what was expected; the loader adds where the value
came from and collects every problem before raising one ConfigError.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .checks import one_line_problem, suggest, url_problem
from .errors import ConfigError

CONFIG_FILE = "newsletter.toml"
ENV_PREFIX = "NEWSLETTER_"


class Option:
    def __init__(self, default: Any = None, required: bool = False, help: str = ""):
        self.default = default
        self.required = required
        self.help = help

    def validate(self, value: Any) -> Any:
        return value


class Str(Option):
    def validate(self, value):
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        if problem := one_line_problem(value):
            raise ValueError(problem)
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()


class HttpsUrl(Str):
    def validate(self, value):
        value = super().validate(value).rstrip("/")
        if problem := url_problem(value):
            raise ValueError(problem)
        return value


class Email(Str):
    _pattern = re.compile(r"[^@\s<>(),;:\"\[\]]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+")

    def validate(self, value):
        value = super().validate(value)
        if not self._pattern.fullmatch(value):
            raise ValueError(f"expected an email address like news@example.com, got {value!r}")
        return value


class Language(Str):
    def validate(self, value):
        value = super().validate(value)
        if not re.fullmatch(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*", value):
            raise ValueError(f"expected a language tag like en or en-GB, got {value!r}")
        return value


class Color(Str):
    def validate(self, value):
        value = super().validate(value)
        if not re.fullmatch(r"#(?:[0-9a-fA-F]{3}){1,2}", value):
            raise ValueError(f"expected a colour as #rrggbb, got {value!r}")
        if len(value) == 4:
            value = "#" + "".join(c * 2 for c in value[1:])
        return value.lower()


class Int(Option):
    def __init__(self, default=None, required=False, min: int = 0, max: int | None = None, help=""):
        super().__init__(default, required, help)
        self.min, self.max = min, max

    def validate(self, value):
        if isinstance(value, str) and re.fullmatch(r"\s*\+?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        if value < self.min or (self.max is not None and value > self.max):
            upper = f" to {self.max}" if self.max is not None else " or more"
            raise ValueError(f"expected a number from {self.min}{upper}, got {value}")
        return value


SCHEMA: dict[str, dict[str, Option]] = {
    "publication": {
        "name": Str(required=True, help="the newsletter's name, shown in the masthead and From"),
        "base_url": HttpsUrl(required=True, help="where the web archive lives; issue pages go below it"),
        "postal_address": Str(required=True, help="the sender's postal address, required by anti-spam laws"),
        "language": Language(default="en"),
        "why": Str(help="one sentence in the footer saying why the reader gets this email"),
    },
    "sender": {
        "address": Email(required=True, help="the From address"),
        "name": Str(help="the From name; defaults to the publication's name"),
        "reply_to": Email(),
    },
    "design": {
        "accent_color": Color(default="#b4232a"),
        "logo_url": HttpsUrl(),
        "logo_alt": Str(),
        "logo_width": Int(default=160, min=16, max=600),
        "templates": Str(default="templates", help="folder of templates, relative to this file"),
    },
}


@dataclass(frozen=True)
class Publication:
    name: str
    base_url: str
    postal_address: str
    language: str
    why: str


@dataclass(frozen=True)
class Sender:
    address: str
    name: str
    reply_to: str | None


@dataclass(frozen=True)
class Design:
    accent_color: str
    logo_url: str | None
    logo_alt: str | None
    logo_width: int
    templates: Path


@dataclass(frozen=True)
class Config:
    path: Path
    publication: Publication
    sender: Sender
    design: Design


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the file (``newsletter.toml`` in the working folder by default), apply the
    environment's overrides, and validate everything, reporting all problems at once."""
    environ = os.environ if environ is None else environ
    config_path = Path(path) if path is not None else Path(CONFIG_FILE)
    try:
        raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        hint = "" if path is not None else " (run newsletter in the folder that has it, or pass --config PATH)"
        raise ConfigError([f"{config_path}: no such file{hint}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{config_path}: cannot read it: {exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{config_path}: invalid TOML: {exc}"]) from exc

    messages: list[str] = []
    values: dict[str, dict[str, Any]] = {}
    for section, given in raw.items():
        if section not in SCHEMA:
            messages.append(f"{config_path}: [{section}]: unknown section{suggest(section, SCHEMA)}")
        elif not isinstance(given, dict):
            messages.append(f"{config_path}: {section}: expected a [{section}] table")
    for section, options in SCHEMA.items():
        given = raw.get(section, {})
        given = given if isinstance(given, dict) else {}
        for key in given:
            if key not in options:
                messages.append(f"{config_path}: {section}.{key}: unknown setting{suggest(key, options)}")
        values[section] = {}
        for key, option in options.items():
            env_name = f"{ENV_PREFIX}{section}_{key}".upper()
            if env_name in environ:
                value, source = environ[env_name], env_name
            elif key in given:
                value, source = given[key], f"{config_path}: {section}.{key}"
            elif option.required:
                messages.append(f"{config_path}: {section}.{key}: required setting is missing ({option.help})")
                continue
            else:
                values[section][key] = option.default
                continue
            try:
                values[section][key] = option.validate(value)
            except ValueError as exc:
                messages.append(f"{source}: {exc}")
    for env_name in sorted(environ):
        if env_name.startswith(ENV_PREFIX):
            section, _, key = env_name[len(ENV_PREFIX):].lower().partition("_")
            if section in SCHEMA and key not in SCHEMA[section]:
                messages.append(f"{env_name}: unknown setting {section}.{key}{suggest(key, SCHEMA[section])}")
    if messages:
        raise ConfigError(messages)

    pub, snd, des = values["publication"], values["sender"], values["design"]
    return Config(
        path=config_path,
        publication=Publication(
            why=pub["why"] or f"You are receiving this because you subscribed to {pub['name']}.",
            **{k: v for k, v in pub.items() if k != "why"},
        ),
        sender=Sender(address=snd["address"], name=snd["name"] or pub["name"], reply_to=snd["reply_to"]),
        design=Design(**{**des, "templates": (config_path.parent / des["templates"]).resolve()}),
    )

