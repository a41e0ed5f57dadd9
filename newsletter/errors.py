"""Every error the tool raises on purpose, and the Problem records they carry.

    NewsletterError            anything the CLI turns into a message and an exit code
     +-- ConfigError           newsletter.toml or a NEWSLETTER_* variable is wrong
     +-- IssueError            one or more issue files are invalid (carries Problems)
     +-- TemplateError         a template in templates/ is broken or uses an unknown name
     +-- OutputError           the output folder cannot be written
     +-- StoreError            the SQLite store cannot be opened or is busy with another send
     +-- RecipientsError       a recipients CSV cannot be read
     +-- SendError             a backend cannot send at all (connection, TLS, login refused)

A Problem is one finding about one place: an error fails the run, a warning fails it
only under --strict. Errors from libraries (yaml, jinja2, OSError) are translated into
these where they happen and chained with ``from exc``; no traceback reaches an author.
"""

from __future__ import annotations

from dataclasses import dataclass

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True, order=True)
class Problem:
    path: str
    line: int
    col: int
    field: str
    message: str
    severity: str = ERROR

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}:{self.col}" if self.line else self.path
        label = "" if self.severity == ERROR else "warning: "
        field = f"{self.field}: " if self.field else ""
        return f"{where}: {label}{field}{self.message}"

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR


class NewsletterError(Exception):
    """Base class; str(error) is what the author reads."""


class ConfigError(NewsletterError):
    def __init__(self, messages: list[str]):
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))


class IssueError(NewsletterError):
    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class TemplateError(NewsletterError):
    pass


class OutputError(NewsletterError):
    pass


class StoreError(NewsletterError):
    pass


class RecipientsError(NewsletterError):
    pass


class SendError(NewsletterError):
    counts: dict[str, int] | None = None  # the ledger when it stopped a send, for the summary
