"""newsletter.toml: the newsletter's own settings, with NEWSLETTER_<SECTION>_<KEY> overrides.

Each setting is a small option object (the mkdocs pattern) whose ``validate`` returns the
clean value or raises ValueError saying what was expected; the loader adds where the value
came from and collects every problem before raising one ConfigError.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlsplit

from .checks import address_problem, one_line_problem, suggest, url_problem
from .errors import ConfigError
from .tokens import TOKEN_LENGTH

CONFIG_FILE = "newsletter.toml"
BACKENDS = ("outbox", "smtp", "sendgrid", "mailgun", "postmark", "resend", "ses")
API_BACKENDS = BACKENDS[2:]
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
        if problem := url_problem(value, ("https",)):
            raise ValueError(problem)
        return value


class Email(Str):
    def validate(self, value):
        value = super().validate(value)
        if address_problem(value):
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


class Seconds(Option):
    def validate(self, value):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"expected a number of seconds, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:  # NaN too
            raise ValueError(f"expected a number of seconds, got {value!r}")
        return float(value)


class Bool(Option):
    def validate(self, value):
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            value = value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value


class Choice(Str):
    def __init__(self, choices: tuple[str, ...], default=None, required=False, help=""):
        super().__init__(default, required, help)
        self.choices = choices

    def validate(self, value):
        value = super().validate(value)
        if value not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}, got {value!r}{suggest(value, self.choices)}")
        return value


class RelativePath(Str):
    """A path; relative ones are taken from the settings file's folder (see load_config)."""


class StoreUrl(Str):
    """postgresql://user@host:port/dbname; never with the password, which libpq takes
    from PGPASSWORD, ~/.pgpass or a service file."""

    def validate(self, value):
        value = super().validate(value)
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 -- raises on a port that is not a number
        except ValueError as exc:
            raise ValueError(f"expected a URL like postgresql://news@db.example.com/news: {exc}") from None
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ValueError(f"expected a URL like postgresql://news@db.example.com/news, got a "
                             f"{parts.scheme or 'schemeless'} URL")
        if parts.password is not None or any(key.strip().lower() == "password"
                                             for key, _ in parse_qsl(parts.query, keep_blank_values=True)):
            raise ValueError("the database password is never read from the settings: put it in PGPASSWORD, "
                             "~/.pgpass or a libpq service file, and remove it from the URL")
        return value


class Secret(Str):
    """Read only from the environment, never from the file; its value is never echoed."""

    def validate(self, value):
        if not isinstance(value, str) or not value.strip():
            raise ValueError("is set but empty")
        if one_line_problem(value.strip()) and "PRIVATE KEY" not in value:
            raise ValueError("must be one line")
        return value.strip()


class HttpUrl(Str):
    """https, or plain http to loopback only (a local test server); used for API base URLs,
    where plain http elsewhere would send the API key and every address in the clear."""

    def validate(self, value):
        value = super().validate(value).rstrip("/")
        if problem := url_problem(value):
            raise ValueError(problem)
        if value[:5].lower() == "http:" and not _is_loopback_host(urlsplit(value).hostname):
            raise ValueError(f"expected an https URL, got {value!r}: plain http would send the API key and "
                             "every address in the clear (http is allowed only to a test server on loopback: "
                             "127.0.0.1, ::1, localhost)")
        return value


def _is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Origins(Option):
    """Web origins (scheme://host[:port]), separated by spaces or commas; "*" for any."""

    def validate(self, value):
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of origins like [\"https://example.com\"], got {value!r}")
        found = []
        for origin in value:
            origin = origin.strip().rstrip("/")
            parts = urlsplit(origin) if not url_problem(origin) else None
            if origin != "*" and (parts is None or parts.path or parts.query or parts.fragment or parts.username):
                raise ValueError(f"expected an origin like https://example.com (scheme, host, optional port; "
                                 f"no path), got {origin!r}")
            found.append(origin if origin == "*" else f"{parts.scheme.lower()}://{parts.netloc.lower()}")
        return tuple(found)


class UrlWithToken(HttpsUrl):
    """https only: mailbox providers make the one-click POST only to https (RFC 8058 section 3)."""

    def validate(self, value):
        try:
            value = super().validate(value.replace("{token}", "TOKEN") if isinstance(value, str) else value)
        except ValueError as exc:  # echo the URL as it was written
            raise ValueError(str(exc).replace("TOKEN", "{token}")) from None
        if "TOKEN" not in value:
            raise ValueError("must contain {token}, where each reader's unsubscribe token goes")
        return value.replace("TOKEN", "{token}")


class VerpAddress(Str):
    """An address, with at most one {token} in its local part (VERP: each bounce names its reader)."""

    def validate(self, value):
        value = super().validate(value)
        local = value.rpartition("@")[0]
        if address_problem(value.replace("{token}", "t")):
            raise ValueError(f"expected an address like bounces+{{token}}@example.com, got {value!r}")
        if value.count("{token}") > 1 or "{token}" in value.rpartition("@")[2]:
            raise ValueError(f"{{token}} may appear once, in the part before the @, got {value!r}")
        if len(local.replace("{token}", "t" * TOKEN_LENGTH)) > 64:  # RFC 5321 section 4.5.3.1.1
            raise ValueError(f"the part before the @ is over 64 characters with a token in it "
                             f"({TOKEN_LENGTH} characters): shorten {local!r}")
        return value


class MailboxName(Str):
    """An IMAP folder name: printable ASCII (others need modified UTF-7), no quotes."""

    def validate(self, value):
        value = super().validate(value)
        if not re.fullmatch(r"[\x20-\x7e]+", value) or '"' in value or "\\" in value:
            raise ValueError(f"expected a folder name in printable ASCII without quotes or backslashes, got {value!r}")
        return value


def _api_options(provider: str, base_url: str, batch: int, rate: float, extra: dict) -> dict[str, Option]:
    """The settings every HTTP API backend has, with the provider's own defaults."""
    return {
        "base_url": HttpUrl(default=base_url or None,
                            help="the API's address (another region, or a test server)"),
        "api_key": Secret(help=f"from NEWSLETTER_{provider.upper()}_API_KEY"),
        "batch_size": Int(default=batch, min=1, max=batch, help="messages a request; the provider's limit at most"),
        "requests_in_flight": Int(default=4, min=1, max=64),
        "requests_per_second": Seconds(default=rate, help="0 for no limit"),
        "timeout": Seconds(default=30.0),
        "max_retries": Int(default=4, min=0, max=20, help="for 429 and connections that never opened (Resend: also timeouts and 5xx)"),
        "retry_delay": Seconds(default=1.0, help="first wait before a retry; doubles each time, with jitter"),
        **extra,
    }


SCHEMA: dict[str, dict[str, Option]] = {
    "publication": {
        "name": Str(required=True, help="the newsletter's name, shown in the masthead and From"),
        "base_url": HttpsUrl(required=True, help="where the web archive lives; issue pages go below it"),
        "postal_address": Str(required=True, help="the sender's postal address, required by anti-spam laws"),
        "language": Language(default="en"),
        "why": Str(help="one sentence in the footer saying why the reader gets this email"),
        "list_id": Str(help="the List-Id, a dotted name such as brief.example.com (default: from name and sender)"),
        "unsubscribe_url": UrlWithToken(help="one-click unsubscribe URL with {token}, e.g. https://example.com/u/{token}"),
        "unsubscribe_mailto": Email(help="address that unsubscribes whoever writes to it"),
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
        "templates": RelativePath(default="templates", help="folder of templates, relative to this file"),
    },
    "store": {
        "path": RelativePath(default="newsletter.sqlite3", help="the SQLite file of subscribers and sends"),
        "url": StoreUrl(help="a PostgreSQL store shared between machines, e.g. postgresql://news@db.example.com/news "
                             "(the password from PGPASSWORD, ~/.pgpass or a service file; [store] path is "
                             "then unused)"),
    },
    "serve": {
        "host": Str(default="127.0.0.1", help="the address `newsletter serve` listens on"),
        "port": Int(default=8080, min=1, max=65535),
        "public_url": HttpsUrl(help="where readers reach the service, e.g. https://news.example.com "
                                    "(the unsubscribe and confirmation links point there)"),
        "forwarded_allow_ips": Str(help="proxies whose X-Forwarded-* headers are trusted, e.g. 127.0.0.1"),
        "max_body": Int(default=65536, min=1024, max=10_000_000, help="the largest request body taken, in bytes"),
        "read_timeout": Seconds(default=30.0, help="a client that takes longer to send a request's headers, "
                                                   "or its body, is cut off (408 for a body; 0: never)"),
    },
    "send": {
        "backend": Choice(BACKENDS, default="outbox"),
        "outbox": RelativePath(default="outbox", help="folder the outbox backend writes .eml files to"),
        "batch_size": Int(default=500, min=1, max=100_000),
        "max_attempts": Int(default=5, min=1, max=100),
        "retry_delay": Seconds(default=60.0, help="first wait before retrying a deferred message; doubles each time"),
        "max_wait": Seconds(default=300.0, help="how long one send run waits for deferred retries to fall due"),
        "breaker": Int(default=10, min=0, max=1_000_000,
                       help="stop the run when this many recipients in a row get the same refusal (0: never)"),
        "secret": Secret(help="signs unsubscribe tokens; from NEWSLETTER_SEND_SECRET or NEWSLETTER_SECRET"),
        "bounce_address": VerpAddress(help="the envelope sender (Return-Path) for SMTP, with {token} in its "
                                           "local part for VERP, e.g. bounces+{token}@example.com "
                                           "(default: [sender] address)"),
    },
    "smtp": {
        "host": Str(default="localhost"),
        "port": Int(default=587, min=1, max=65535),
        "security": Choice(("starttls", "ssl", "none"), default="starttls"),
        "username": Str(),
        "password": Secret(help="from NEWSLETTER_SMTP_PASSWORD"),
        "verify_tls": Bool(default=True),
        "ca_file": RelativePath(help="extra CA certificates (PEM) to trust, e.g. a private relay's"),
        "connections": Int(default=4, min=1, max=64),
        "messages_per_connection": Int(default=100, min=1, max=1_000_000),
        "timeout": Seconds(default=30.0),
        "give_up_after": Seconds(default=120.0, help="stop the run when no connection has got through (refused, "
                                 "421, timed out) for this long; until then only the failing connection's "
                                 "messages are deferred, and it retries with backoff"),
        "helo_name": Str(help="the name given in EHLO (default: this machine's name)"),
    },
    **{provider: _api_options(provider, url, batch, rate, extra) for provider, (url, batch, rate, extra) in {
        "sendgrid": ("https://api.sendgrid.com", 1000, 0.0, {}),
        "mailgun": ("https://api.mailgun.net", 1000, 0.0, {
            "domain": Str(help="your Mailgun sending domain, e.g. mg.example.com")}),
        "postmark": ("https://api.postmarkapp.com", 500, 0.0, {
            "message_stream": Str(default="broadcast", help="a Broadcast stream's ID: newsletters must use one"),
            "transactional_stream": Str(default="outbound", help="a Transactional stream's ID: sign-up confirmations")}),
        "resend": ("https://api.resend.com", 100, 2.0, {}),
        "ses": ("", 1, 14.0, {
            "region": Str(default="us-east-1"),
            "configuration_set": Str(help="an SES configuration set for event publishing")}),
    }.items()},
    "signup": {
        "enabled": Bool(default=False, help="answer /subscribe (sign-up with double opt-in) in `newsletter serve`"),
        "allowed_origins": Origins(default=(), help="other sites whose pages may post to /subscribe (CORS)"),
        "confirm_hours": Int(default=48, min=1, max=24 * 30, help="how long a confirmation link stays valid"),
        "resend_minutes": Int(default=30, min=0, max=7 * 24 * 60,
                              help="at most one confirmation per address in this many minutes"),
        "address_limit": Int(default=5, min=0, max=1_000_000,
                             help="sign-up requests per address per hour (token bucket, per process; 0: none)"),
        "client_limit": Int(default=20, min=0, max=1_000_000,
                            help="sign-up requests per client IP per hour (token bucket, per process; 0: none)"),
        "backend": Choice(BACKENDS, help="what sends confirmations (default: [send] backend)"),
        "send_timeout": Seconds(default=30.0, help="the longest one confirmation may take to send"),
    },
    "webhooks": {  # providers' event webhooks (newsletter/web/webhooks.py); each is on when its secret is set
        "sendgrid_public_key": Secret(help="the Signed Event Webhook's verification key (base64 DER), "
                                           "from NEWSLETTER_WEBHOOKS_SENDGRID_PUBLIC_KEY"),
        "mailgun_signing_key": Secret(help="the HTTP webhook signing key, from NEWSLETTER_WEBHOOKS_MAILGUN_SIGNING_KEY"),
        "postmark_username": Secret(help="the webhook's basic-auth user, from NEWSLETTER_WEBHOOKS_POSTMARK_USERNAME"),
        "postmark_password": Secret(help="its password, from NEWSLETTER_WEBHOOKS_POSTMARK_PASSWORD"),
        "postmark_allow_ips": Str(help="optional: only these addresses or networks, comma-separated"),
        "resend_secret": Secret(help="the webhook's signing secret (whsec_...), from NEWSLETTER_WEBHOOKS_RESEND_SECRET"),
        "ses_enabled": Bool(default=False, help="take Amazon SNS notifications of SES events at /webhooks/ses"),
        "ses_topic_arns": Str(help="optional: only these SNS topics, comma-separated"),
        "sns_cert_host": Str(default=r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?",
                             help="a regular expression the SigningCertURL and SubscribeURL host must match"),
        "sns_ca_file": RelativePath(help="extra CA certificates (PEM) to trust when fetching from SNS (tests)"),
        "max_age": Seconds(default=300.0, help="how old a signed timestamp may be (Mailgun, Resend)"),
        "max_body": Int(default=10_000_000, min=1024, max=100_000_000, help="the largest webhook body taken, in bytes"),
    },
    "inbox": {  # `newsletter inbox`: bounces, complaints and mailto unsubscribes read over IMAP
        "host": Str(help="the IMAP server of the bounce mailbox"),
        "port": Int(default=993, min=1, max=65535),
        "security": Choice(("ssl", "starttls"), default="ssl", help="IMAPS or STARTTLS; the certificate is verified"),
        "username": Str(),
        "password": Secret(help="from NEWSLETTER_INBOX_PASSWORD"),
        "folder": MailboxName(default="INBOX", help="where bounces arrive"),
        "processed_folder": MailboxName(default="newsletter-processed", help="where handled mail is moved"),
        "ca_file": RelativePath(help="extra CA certificates (PEM) to trust, e.g. a private server's"),
        "timeout": Seconds(default=30.0),
    },
    "dkim": {
        "domain": Str(help="the signing domain (d=); DKIM is on when this and the key are set"),
        "selector": Str(default="newsletter"),
        "private_key": Secret(help="PEM private key, from NEWSLETTER_DKIM_PRIVATE_KEY"),
    },
}

# Secrets also accepted under a shorter, conventional name.
ENV_ALIASES = {"NEWSLETTER_SEND_SECRET": "NEWSLETTER_SECRET"}


@dataclass(frozen=True)
class Publication:
    name: str
    base_url: str
    postal_address: str
    language: str
    why: str
    list_id: str
    unsubscribe_url: str | None
    unsubscribe_mailto: str | None


@dataclass(frozen=True)
class Sender:
    address: str
    name: str
    reply_to: str | None

    @property
    def domain(self) -> str:
        return self.address.rsplit("@", 1)[1].lower()


@dataclass(frozen=True)
class Design:
    accent_color: str
    logo_url: str | None
    logo_alt: str | None
    logo_width: int
    templates: Path


@dataclass(frozen=True)
class Store:
    path: Path
    url: str | None = None


@dataclass(frozen=True)
class Serve:
    host: str
    port: int
    public_url: str | None
    forwarded_allow_ips: str | None
    max_body: int
    read_timeout: float = 30.0


@dataclass(frozen=True)
class Signup:
    enabled: bool
    allowed_origins: tuple[str, ...]
    confirm_hours: int
    resend_minutes: int
    address_limit: int
    client_limit: int
    backend: str | None
    send_timeout: float


@dataclass(frozen=True)
class Send:
    backend: str
    outbox: Path
    batch_size: int
    max_attempts: int
    retry_delay: float
    max_wait: float
    breaker: int
    secret: str | None = field(repr=False)
    bounce_address: str | None = None


@dataclass(frozen=True)
class Smtp:
    host: str
    port: int
    security: str
    username: str | None
    password: str | None = field(repr=False)
    verify_tls: bool = True
    ca_file: Path | None = None
    connections: int = 4
    messages_per_connection: int = 100
    timeout: float = 30.0
    give_up_after: float = 120.0
    helo_name: str | None = None


@dataclass(frozen=True)
class Api:
    """One HTTP API provider's settings; `extra` holds the provider's own (domain, region...)."""

    base_url: str | None
    api_key: str | None = field(repr=False)
    batch_size: int
    requests_in_flight: int
    requests_per_second: float
    timeout: float
    max_retries: int
    retry_delay: float
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Dkim:
    domain: str | None
    selector: str
    private_key: str | None = field(repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.domain and self.private_key)


@dataclass(frozen=True)
class Webhooks:
    sendgrid_public_key: str | None = field(repr=False)
    mailgun_signing_key: str | None = field(repr=False)
    postmark_username: str | None = field(repr=False)
    postmark_password: str | None = field(repr=False)
    postmark_allow_ips: str | None
    resend_secret: str | None = field(repr=False)
    ses_enabled: bool = False
    ses_topic_arns: str | None = None
    sns_cert_host: str = ""
    sns_ca_file: Path | None = None
    max_age: float = 300.0
    max_body: int = 10_000_000


@dataclass(frozen=True)
class Inbox:
    host: str | None
    port: int
    security: str
    username: str | None
    password: str | None = field(repr=False)
    folder: str = "INBOX"
    processed_folder: str = "newsletter-processed"
    ca_file: Path | None = None
    timeout: float = 30.0


@dataclass(frozen=True)
class Config:
    path: Path
    publication: Publication
    sender: Sender
    design: Design
    store: Store
    serve: Serve
    send: Send
    smtp: Smtp
    dkim: Dkim
    signup: Signup
    apis: dict[str, Api] = field(default_factory=dict)
    webhooks: Webhooks | None = None
    inbox: Inbox | None = None


SECTIONS = {"publication": Publication, "sender": Sender, "design": Design, "store": Store, "serve": Serve,
            "send": Send, "smtp": Smtp, "dkim": Dkim, "signup": Signup, "webhooks": Webhooks, "inbox": Inbox}


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


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
            name = env_name(section, key)
            names = [n for n in (name, ENV_ALIASES.get(name)) if n]
            from_env = next((n for n in names if n in environ), None)
            if isinstance(option, Secret) and key in given:
                messages.append(f"{config_path}: {section}.{key}: secrets are not read from the file; "
                                f"set the environment variable {names[-1]} instead, and remove it here")
                continue
            if from_env:
                value, source = environ[from_env], from_env
            elif key in given:
                value, source = given[key], f"{config_path}: {section}.{key}"
            elif option.required:
                messages.append(f"{config_path}: {section}.{key}: required setting is missing ({option.help})")
                continue
            else:
                value, source = option.default, None
            if source is not None:
                try:
                    value = option.validate(value)
                except ValueError as exc:
                    messages.append(f"{source}: {exc}")
                    continue
            if isinstance(option, RelativePath) and value is not None:
                value = (config_path.parent / value).resolve()
            values[section][key] = value
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in ENV_ALIASES.values():
            section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
            if section in SCHEMA and key not in SCHEMA[section]:
                messages.append(f"{name}: unknown setting {section}.{key}{suggest(key, SCHEMA[section])}")
    if messages:
        raise ConfigError(messages)

    pub, snd = values["publication"], values["sender"]
    pub["why"] = pub["why"] or f"You are receiving this because you subscribed to {pub['name']}."
    snd["name"] = snd["name"] or pub["name"]
    domain = snd["address"].rsplit("@", 1)[1].lower()
    pub["list_id"] = pub["list_id"] or f"{_slug(pub['name'])}.{domain}"
    apis = {}
    for provider in API_BACKENDS:
        common = {k: v for k, v in values[provider].items() if k in Api.__dataclass_fields__}
        apis[provider] = Api(**common, extra={k: v for k, v in values[provider].items() if k not in common})
    return Config(path=config_path, apis=apis,
                  **{section: cls(**values[section]) for section, cls in SECTIONS.items()})


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "newsletter"
