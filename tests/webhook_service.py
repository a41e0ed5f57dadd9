"""Test helpers for the webhooks: the service run by uvicorn on a free loopback port, and a
loopback HTTPS server standing in for Amazon SNS (its certificates made with openssl)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`create_app(config)` served by uvicorn in a background thread, as `newsletter serve` does."""

    def __init__(self, config):
        import uvicorn

        from newsletter.web.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the service did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def openssl_certificate(folder: Path, name: str, subject: str, san: str | None = None) -> tuple[Path, Path]:
    """A self-signed RSA certificate and its key, made by openssl."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    args = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject,
            "-keyout", str(key), "-out", str(cert)]
    if san:
        args += ["-addext", f"subjectAltName={san}"]
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    return cert, key


class SnsStandIn:
    """HTTPS on loopback: serves the signing certificate and records each visit (SubscribeURL)."""

    def __init__(self, tls_cert: Path, tls_key: Path, signing_cert: Path):
        self.visits: list[str] = []
        pem = signing_cert.read_bytes()
        visits = self.visits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                visits.append(self.path)
                if self.path.endswith(".pem"):
                    body, status = pem, 200
                elif self.path.startswith("/?Action=ConfirmSubscription"):
                    body, status = b"<ConfirmSubscriptionResponse/>", 200
                else:
                    body, status = b"not found", 404
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls_cert, tls_key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://localhost:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
