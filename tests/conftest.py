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
    """`python -m newsletter ARGS` as a user runs it; NEWSLETTER_* from the outside left out."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    result = subprocess.run([sys.executable, "-m", "newsletter", *map(str, args)], cwd=cwd,
                            env={**base, **(env or {})}, capture_output=True, text=True, timeout=60)
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
    """The repository's settings with these environment overrides (nothing else)."""
    from newsletter.config import load_config
    return load_config(ROOT / "newsletter.toml", environ=env)


def subscribe(config, addresses):
    from newsletter.recipients import Recipient
    from newsletter.store import Store
    with Store(config.store.path) as store:
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
