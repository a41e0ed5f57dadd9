"""Small value checks shared by the issue reader and the config loader.

Each returns None when the value is fine, or a sentence saying what was expected.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from urllib.parse import urlsplit

WEB_SCHEMES = ("http", "https")


_LINE_BREAK = re.compile("[\r\n\x85\u2028\u2029]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc
_CONTROL_BUT_NEWLINE_TAB = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def one_line_problem(value: str) -> str | None:
    if _LINE_BREAK.search(value):
        return "must be one line, but holds a line break"
    return control_char_problem(value, _CONTROL)


def control_char_problem(value: str, pattern: re.Pattern = _CONTROL_BUT_NEWLINE_TAB) -> str | None:
    """By default for multi-line text: line breaks and tabs are fine, other controls not."""
    if m := pattern.search(value):
        return f"holds a control character (U+{ord(m.group()):04X}); remove it"
    return None


def url_problem(value: str, schemes: tuple[str, ...] = WEB_SCHEMES) -> str | None:
    wanted = "an absolute " + ("http(s)" if schemes == WEB_SCHEMES else "/".join(schemes)) + " URL"
    if not value or any(ch.isspace() for ch in value) or _CONTROL.search(value):
        return f"expected {wanted}, got {value!r}" + (" (it holds a space)" if value else "")
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        return f"expected {wanted}, got {value!r}"
    if parts.scheme.lower() not in schemes:
        return f"expected {wanted}, got {value!r}"
    if parts.scheme.lower() in WEB_SCHEMES and not host:
        return f"expected {wanted} with a host name, got {value!r}"
    return None


# Addresses, deliberately plain: ASCII dot-atom local part, a domain of at least two labels.
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def address_problem(address: str) -> str | None:
    if not address:
        return "no address"
    if len(address) > 254:
        return "longer than 254 characters"
    if not address.isascii():
        return "non-ASCII addresses are not supported"
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return "expected an address like name@example.com"
    if len(local) > 64 or not _LOCAL.fullmatch(local):
        return f"{local!r} is not a valid mailbox name"
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return f"{domain!r} is not a valid domain"
    return None



def is_plain_http(value: str) -> bool:
    return value[:5].lower() == "http:"


def suggest(key: str, known) -> str:
    """'; did you mean X?' for a near miss, else the list of what is allowed."""
    close = difflib.get_close_matches(key.lower(), list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else "; expected one of " + ", ".join(known)


def slugify(text: str, max_len: int = 60) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "issue"


_ISSUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def issue_name_problem(stem: str) -> str | None:
    """An issue's file name becomes a URL path, a Message-ID part, a folder and a ledger key."""
    if _ISSUE_NAME.fullmatch(stem) and not stem.endswith("."):
        return None
    return (f"the file name {stem!r} cannot name the issue's web page, Message-ID and folder: use ASCII letters, "
            f"digits, '-', '_' and '.', not first, at most 100; for example {slugify(stem, 100)}")
