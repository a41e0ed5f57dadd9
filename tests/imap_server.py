"""A real IMAP server on loopback for the inbox tests: a throwaway Debian dovecot with its own
settings, one user, a Maildir under a temporary folder, IMAPS and STARTTLS listeners."""

from __future__ import annotations

import imaplib
import pwd
import shutil
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from smtp_server import free_port, make_certificate

USER, PASSWORD = "bounces", "imap password never printed 7f3a"

CONF = """\
base_dir = {root}/run
state_dir = {root}/state
instance_name = newsletter-test-{imaps}
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
auth_mechanisms = plain login
mail_location = maildir:{root}/mail/%u
first_valid_uid = {uid}
last_valid_uid = {uid}
mail_uid = {uid}
mail_gid = {gid}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = {imaps}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
"""


class Dovecot:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="newsletter-dovecot-"))
        self.root.chmod(0o755)  # dovecot's own users (dovecot, dovenull) read the settings and the users file
        self.cert, key = make_certificate(self.root)
        key.chmod(0o644)
        self.imap_port, self.imaps_port = free_port(), free_port()
        owner = pwd.getpwnam("nobody")
        (self.root / "mail").mkdir()
        shutil.chown(self.root / "mail", owner.pw_uid, owner.pw_gid)
        (self.root / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        self.conf = self.root / "dovecot.conf"
        self.conf.write_text(CONF.format(root=self.root, uid=owner.pw_uid, gid=owner.pw_gid,
                                         imap=self.imap_port, imaps=self.imaps_port))
        # dovecot forks into the background: a captured stdout would stay open, so a file takes it
        with open(self.root / "start.log", "wb") as out:
            subprocess.run(["dovecot", "-c", str(self.conf)], check=True, stdout=out, stderr=out)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                with self.connect():
                    return
            except (OSError, imaplib.IMAP4.error):
                if time.monotonic() > deadline:
                    raise RuntimeError("dovecot did not start: " + self.log())
                time.sleep(0.1)

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text() if path.exists() else ""

    def connect(self) -> imaplib.IMAP4_SSL:
        context = ssl.create_default_context(cafile=str(self.cert))
        imap = imaplib.IMAP4_SSL("127.0.0.1", self.imaps_port, ssl_context=context, timeout=10)
        imap.login(USER, PASSWORD)
        return imap

    def append(self, data: bytes, folder: str = "INBOX") -> None:
        with self.connect() as imap:
            typ, detail = imap.append(folder, None, None, data)
            assert typ == "OK", detail

    def messages(self, folder: str = "INBOX") -> list[bytes]:
        """Every message in `folder` (none if it does not exist), without marking them seen."""
        with self.connect() as imap:
            typ, _ = imap.select(f'"{folder}"', readonly=True)
            if typ != "OK":
                return []
            _, data = imap.uid("SEARCH", None, "ALL")
            found = []
            for uid in data[0].split():
                _, parts = imap.uid("FETCH", uid, "(BODY.PEEK[])")
                found.append(parts[0][1])
            return found

    def clear(self, folders=("newsletter-processed",)) -> None:
        """An empty INBOX, and none of `folders`."""
        with self.connect() as imap:
            for folder in folders:
                imap.delete(f'"{folder}"')  # NO if it is not there: fine
            _, data = imap.select("INBOX")
            if int(data[0]):
                imap.store("1:*", "+FLAGS", "\\Deleted")
                imap.expunge()

    def stop(self) -> None:
        subprocess.run(["doveadm", "-c", str(self.conf), "stop"], capture_output=True)
        # `doveadm stop` returns once asked; wait for the master to be gone before removing its folder
        pid_file = self.root / "run" / "master.pid"
        deadline = time.monotonic() + 10
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)
