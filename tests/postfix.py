"""A throwaway postfix on loopback, as an oracle for the SMTP client: real `smtpd` with
STARTTLS on 127.0.0.1:<free port>, its own config, queue and data folders under a tmp
folder, relaying everything it accepts to an aiosmtpd sink on loopback, where a test counts
what arrived. Needs root (postfix's master runs as root) and Debian's postfix package.

Senders listed in SENDERS are refused at RCPT the way postfix refuses a sender domain that
does not exist: "553 5.1.8 <addr>: Sender address rejected: Domain not found" (from an
access map: there is no DNS here, and reject_unknown_sender_domain without DNS answers a
temporary 450 4.1.8 instead)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from smtp_server import Handler, Server, free_port

REFUSED_SENDER = "brief@watchman.example"  # the repository's sender: its domain "does not exist"
SENDERS = {REFUSED_SENDER: "553 5.1.8 Domain not found"}

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def installed() -> bool:
    return bool(shutil.which("postfix") and shutil.which("postconf")) and os.geteuid() == 0


class Postfix:
    """`with Postfix(folder, cert) as mta:` mta.port (smtpd), mta.sink (the aiosmtpd Handler)."""

    def __init__(self, cert: tuple[Path, Path]):
        # Its own folder, not pytest's: postfix's daemons run as the postfix user, who must
        # be able to reach it (pytest's tmp folders are root's alone, mode 0700).
        self.folder = Path(tempfile.mkdtemp(prefix="newsletter-postfix-"))
        self.folder.chmod(0o755)
        self.cert = cert
        self.etc, self.queue, self.data = (self.folder / d for d in ("etc", "queue", "data"))
        self.port = free_port()
        self.sink = Handler()
        self.sink_server = Server(self.sink, tls=None, auth=False)

    def postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["postfix", "-c", str(self.etc), *args], capture_output=True, text=True, timeout=60)

    def __enter__(self) -> "Postfix":
        self.sink_server.__enter__()
        for d in (self.etc, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data, "postfix")
        senders = self.etc / "senders"
        senders.write_text("".join(f"{a} {r}\n" for a, r in SENDERS.items()))
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port))
        (self.etc / "main.cf").write_text("compatibility_level = 3.6\n")
        settings = {
            "queue_directory": self.queue, "data_directory": self.data,
            "maillog_file": self.folder / "maillog", "maillog_file_prefixes": self.folder,
            "myhostname": "mta.postfix.test", "mydomain": "postfix.test", "myorigin": "$myhostname",
            "mydestination": "", "local_recipient_maps": "", "alias_maps": "", "alias_database": "",
            "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4", "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{self.sink_server.port}", "smtp_tls_security_level": "none",
            "smtp_dns_support_level": "disabled", "smtp_host_lookup": "native",
            "smtpd_tls_cert_file": self.cert[0], "smtpd_tls_key_file": self.cert[1],
            "smtpd_tls_security_level": "may", "smtpd_tls_received_header": "yes",  # "(using TLSv1.3 ...)"
            "smtpd_sender_restrictions": f"check_sender_access texthash:{senders}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s",
            "message_size_limit": "20000000",
        }
        subprocess.run(["postconf", "-c", str(self.etc), "-e", *(f"{k}={v}" for k, v in settings.items())],
                       check=True, capture_output=True, timeout=60)
        started = self.postfix("start")
        if started.returncode != 0:
            self.sink_server.__exit__(None, None, None)
            raise RuntimeError(f"postfix did not start: {started.stderr}{self.log()}")
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        import socket
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postfix is not listening on {self.port}: {self.log()}") from None
                time.sleep(0.05)

    def log(self, tail: int = 4000) -> str:
        path = self.folder / "maillog"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def wait_delivered_to(self, recipients, timeout: float = 30.0) -> None:
        """Until the sink has a message for each: postfix relays in its own time (a wait, not a
        timing assertion)."""
        deadline = time.monotonic() + timeout
        while not set(recipients) <= set(self.sink.delivered()):
            if time.monotonic() > deadline:
                raise AssertionError(f"postfix did not relay to everyone: {self.log()}")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.postfix("stop")
        self.sink_server.__exit__(None, None, None)
        shutil.rmtree(self.folder, ignore_errors=True)
