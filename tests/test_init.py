"""`newsletter init` as a new user runs it, and the wheel: built from this tree, installed into
a fresh venv outside the repository, it must carry the templates and the example by itself."""

import email
import email.policy
import os
import pty
import select
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

from conftest import ROOT

FLAGS = ["--name", "Field Notes", "--sender", "news@fieldnotes.example",
         "--postal-address", "Field Notes, 1 Main St, Springfield"]
ISSUE = "issues/2021-08-13-china-taliban.yaml"


def cli(*args, cwd, exe=(sys.executable, "-m", "newsletter"), env=None):
    """The command as a user runs it, with no terminal on standard input (as in CI or a script)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    result = subprocess.run([*exe, *map(str, args)], cwd=cwd, env={**base, **(env or {})}, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr + result.stdout
    return result


def emls(folder: Path) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
            for p in sorted(folder.glob("outbox/*/*.eml"))]


def test_init_makes_a_folder_that_builds_and_sends_without_templates_of_its_own(tmp_path):
    made = cli("init", "letter", *FLAGS, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    folder = tmp_path / "letter"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "issues", ISSUE, "newsletter.toml", "subscribers.csv"]
    settings = tomllib.loads((folder / "newsletter.toml").read_text())
    assert settings["publication"]["name"] == "Field Notes"
    assert settings["publication"]["base_url"] == "https://fieldnotes.example/newsletter"
    assert settings["sender"]["address"] == "news@fieldnotes.example"
    assert "# Every setting can be overridden" in (folder / "newsletter.toml").read_text()  # commented

    built = cli("build", cwd=folder)
    assert built.returncode == 0, built.stderr
    page = (folder / "dist/2021-08-13-china-taliban/email.html").read_text()
    assert "Field Notes" in page and "1 Main St, Springfield" in page

    sent = cli("send", ISSUE, "--to", "subscribers.csv", cwd=folder)
    assert sent.returncode == 0, sent.stderr
    messages = emls(folder)
    assert len(messages) == 5  # six rows, one address twice
    assert {m["From"].addresses[0].addr_spec for m in messages} == {"news@fieldnotes.example"}
    assert all(m["List-Unsubscribe"].startswith("<https://fieldnotes.example/unsubscribe/") for m in messages)
    assert "1 Main St, Springfield" in messages[0].get_body(("plain",)).get_content()


def test_without_a_terminal_every_missing_flag_is_named_and_nothing_is_written(tmp_path):
    result = cli("init", "letter", "--sender", "not an address", cwd=tmp_path)
    assert result.returncode == 2
    assert "--name is missing" in result.stderr and "--postal-address is missing" in result.stderr
    assert "--sender: expected an email address" in result.stderr
    assert "not a terminal" in result.stderr
    assert not (tmp_path / "letter").exists()

    result = cli("init", *FLAGS, "--base-url", "http://plain.example", cwd=tmp_path)
    assert result.returncode == 2 and "--base-url:" in result.stderr and "https" in result.stderr
    assert not (tmp_path / "newsletter.toml").exists()


def test_an_existing_newsletter_is_never_overwritten(tmp_path):
    (tmp_path / "newsletter.toml").write_text("# mine\n")
    result = cli("init", *FLAGS, cwd=tmp_path)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (tmp_path / "newsletter.toml").read_text() == "# mine\n"
    assert not (tmp_path / "issues").exists()


def test_the_folders_templates_override_the_packaged_ones_file_by_file(tmp_path):
    assert cli("init", *FLAGS, cwd=tmp_path).returncode == 0
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "keep.txt").write_text("mine")
    copied = cli("init", "--templates", cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr
    assert sorted(p.name for p in (tmp_path / "templates").iterdir()) == \
        sorted([p.name for p in (ROOT / "templates").iterdir()] + ["keep.txt"])
    assert (tmp_path / "templates/email.mjml").read_text() == (ROOT / "templates/email.mjml").read_text()
    # the folder's own text template wins; the deleted email.mjml falls back to the packaged one
    text = tmp_path / "templates/email.txt"
    text.write_text(text.read_text().replace("View this issue in your browser:", "Read it on the web:", 1))
    (tmp_path / "templates/email.mjml").unlink()
    built = cli("build", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    out = tmp_path / "dist/2021-08-13-china-taliban"
    assert "Read it on the web:" in (out / "email.txt").read_text()
    assert "View in your browser" in (out / "email.html").read_text()

    again = cli("init", "--templates", cwd=tmp_path)  # only the missing file is copied again
    assert again.returncode == 0
    assert [line.rsplit("/", 1)[1] for line in again.stdout.splitlines() if line.startswith("wrote")] == ["email.mjml"]
    assert "Read it on the web" in text.read_text() and "kept" in again.stdout


def test_on_a_terminal_it_asks_and_asks_again_after_a_wrong_answer(tmp_path):
    pid, fd = pty.fork()
    if pid == 0:  # the child: its standard input is the terminal
        os.chdir(tmp_path)
        os.execvpe(sys.executable, [sys.executable, "-m", "newsletter", "init", "letter"],
                   {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")})
    screen = b""
    answers = [(b"name", b"Field Notes"), (b"Sender address", b"nobody"), (b"expected an email address", b""),
               (b"Sender address", b"news@fieldnotes.example"), (b"postal address", b"1 Main St, Springfield"),
               (b"[https://fieldnotes.example/newsletter]", b"")]
    deadline = time.monotonic() + 60  # a bound for a child that hangs, not a timing check
    for expect, answer in answers:
        while expect not in screen:
            assert time.monotonic() < deadline, screen.decode(errors="replace")
            if select.select([fd], [], [], 1)[0]:
                screen += os.read(fd, 4096)
        screen = screen[screen.index(expect) + len(expect):]
        os.write(fd, answer + b"\n")
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, screen.decode(errors="replace")
    settings = tomllib.loads((tmp_path / "letter/newsletter.toml").read_text())
    assert settings["sender"]["address"] == "news@fieldnotes.example"
    assert settings["publication"]["base_url"] == "https://fieldnotes.example/newsletter"
    assert settings["publication"]["postal_address"] == "1 Main St, Springfield"


# -- the wheel --------------------------------------------------------------------------------

BUILD_LEFTOVERS = shutil.ignore_patterns(".git", ".venv", "build", "dist", "site", "outbox", "*.egg-info",
                                         "__pycache__", ".node", "node_modules", ".hypothesis", ".pytest_cache", "artifacts", "*.sqlite3*")


def test_the_wheel_alone_carries_templates_and_example(tmp_path):
    # A copy of the tree, so no stale build/ of an earlier build can fill a gap in the wheel.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=BUILD_LEFTOVERS)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-index",
                            "--no-build-isolation", "-w", str(wheels)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = wheels.glob("newsletter-*.whl")

    # A fresh venv with only the wheel in it; the dependencies come from this venv's site-packages
    # through a .pth line (a path, not a site dir: its .pth files, and so the editable install of
    # this checkout, are not read).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr

    letter = tmp_path / "letter"
    letter.mkdir()
    assert ROOT not in letter.resolve().parents
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": ""}
    where = subprocess.run([python, "-c", "import newsletter.render as r; print(r.__file__); "
                            "print(r.PACKAGED_TEMPLATES.resolve())"], cwd=letter, capture_output=True, text=True,
                           check=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's copy, not this checkout
    assert not Path(where[1]).is_symlink() and (Path(where[1]) / "email.mjml").is_file()

    exe = (str(venv / "bin" / "newsletter"),)
    for args in (("init", *FLAGS), ("build",), ("send", ISSUE, "--to", "subscribers.csv")):
        result = cli(*args, cwd=letter, exe=exe, env=env)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert not (letter / "templates").exists()
    assert (letter / "dist/2021-08-13-china-taliban/index.html").is_file()
    messages = emls(letter)
    assert len(messages) == 5 and "Field Notes" in messages[0]["From"]
