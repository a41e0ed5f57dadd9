import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "issues" / "2021-08-13-china-taliban.yaml"

MINIMAL = """\
subject: A small issue
date: 2024-03-01
preheader: What this issue is about.
lead:
  source: Example News
  title: Something happened
  url: https://example.com/story
  body: |
    First paragraph.
"""


@pytest.fixture
def write_issue(tmp_path):
    """Write YAML text (dedented) to a file and return its path."""
    def write(text: str, name: str = "issue.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path
    return write


@pytest.fixture(scope="session")
def config():
    from newsletter.config import load_config
    return load_config(ROOT / "newsletter.toml", environ={})


@pytest.fixture(scope="session")
def renderer(config):
    from newsletter.render import Renderer
    return Renderer(config)


@pytest.fixture(scope="session")
def example(renderer):
    """The example issue, rendered once for the whole session."""
    from newsletter.reader import read_issue
    return renderer.render(read_issue(EXAMPLE))


def run_cli(*args, cwd=ROOT, env=None):
    """`python -m newsletter ARGS` as a user runs it; NEWSLETTER_* from the outside left out
    (but the store of the backend under test, see store_backend)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    result = subprocess.run([sys.executable, "-m", "newsletter", *map(str, args)], cwd=cwd,
                            env={**base, **store_env(), **(env or {})}, capture_output=True, text=True,
                            timeout=60)
    assert "Traceback" not in result.stderr + result.stdout
    return result


@pytest.fixture
def project(tmp_path):
    """A newsletter folder of one's own: settings, templates and an issues/ folder."""
    shutil.copy(ROOT / "newsletter.toml", tmp_path)
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    (tmp_path / "issues").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "issues")
    return tmp_path


def config_for(env):
    """The repository's settings with these environment overrides (nothing else, but the
    store of the backend under test)."""
    from newsletter.config import load_config
    return load_config(ROOT / "newsletter.toml", environ={**store_env(), **env})


def store_of(config):
    """The store the settings name, SQLite or PostgreSQL."""
    from newsletter.store import open_store
    return open_store(config.store)


def subscribe(config, addresses):
    from newsletter.recipients import Recipient
    with store_of(config) as store:
        for address in addresses:
            store.add(Recipient(address, f"Reader {address.split('@')[0]}"), "test")


def addresses(n, prefix="r"):
    return [f"{prefix}{i}@example.com" for i in range(n)]


def require(what: str, present: bool) -> None:
    """Skip a test whose oracle (postfix, Mail::DKIM) is not installed here; under CI=true
    fail instead, so that a missing package never passes as a skipped test."""
    if present:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is not installed, and CI=true: .ci/run must install it")
    pytest.skip(f"{what} is not installed")


# -- the store under test ------------------------------------------------------------------------
# A test module that uses the fixture `store_backend` (pytestmark = usefixtures) runs each
# test twice: on SQLite, and on a database of its own in a throwaway PostgreSQL server
# (tests/pg_server.py). config_for and run_cli then name that store; tests open it with
# store_of(config). Tests marked sqlite_only (SQLite's own schema upgrades) run once.

_STORE_URL: dict[str, str | None] = {"url": None}


def store_env() -> dict[str, str]:
    return {"NEWSLETTER_STORE_URL": _STORE_URL["url"]} if _STORE_URL["url"] else {}


def pytest_generate_tests(metafunc):
    if "store_backend" in metafunc.fixturenames:
        both = not metafunc.definition.get_closest_marker("sqlite_only")
        metafunc.parametrize("store_backend", ["sqlite", "postgresql"] if both else ["sqlite"], indirect=True)


@pytest.fixture(scope="session")
def pg_server():
    import pg_server as pg
    require("PostgreSQL (Debian's postgresql)", pg.installed())
    try:
        import psycopg  # noqa: F401
    except ImportError:
        require("psycopg", False)
    with pg.PostgresServer() as server:
        yield server


@pytest.fixture
def new_store(tmp_path, store_backend):
    """Opens the store under test: a SQLite file in tmp_path, or this test's PostgreSQL database."""
    from newsletter.store import open_at
    return lambda: open_at(_STORE_URL["url"] or tmp_path / "store.sqlite3")


@pytest.fixture
def store_backend(request, monkeypatch):
    if request.param == "sqlite":
        yield "sqlite"
        return
    server = request.getfixturevalue("pg_server")
    monkeypatch.setenv("PGPASSWORD", server.env()["PGPASSWORD"])
    _STORE_URL["url"] = server.new_database()
    try:
        yield "postgresql"
    finally:
        _STORE_URL["url"] = None
