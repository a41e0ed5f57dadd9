"""How fast the service takes a provider's batch of events: a SendGrid-sized batch of
1,000 signed events POSTed to `newsletter serve` (a real process, on loopback), checked,
parsed and committed to the store in one transaction. Goal: under 100 ms a batch.

For context, the same work without HTTP: Store.record_events of an equal batch in-process.

    .venv/bin/python bench/webhooks.py [--batches 9] [--events 1000]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from newsletter.config import load_config  # noqa: E402
from newsletter.outcome import COMPLAINT, HARD_BOUNCE, SOFT_BOUNCE, UNSUBSCRIBE, Event  # noqa: E402
from newsletter.recipients import Recipient  # noqa: E402
from newsletter.store import Store  # noqa: E402
from webhook_service import free_port  # noqa: E402

ISSUE = "bench-issue"
KINDS = [("bounce", {"type": "bounce", "reason": "550 5.1.1 no such user"}), ("bounce", {"type": "blocked"}),
         ("spamreport", {}), ("unsubscribe", {}), ("bounce", {"type": "bounce"})]


def prepare(store_path: Path, people: list[str]) -> None:
    with Store(store_path) as store, store.transaction():
        for i, email in enumerate(people):
            store.add(Recipient(email, None), "bench")
            store.db.execute("INSERT INTO deliveries (issue, email, rkey, state, updated_at) VALUES (?, ?, ?, 'sent', 't')",
                             (ISSUE, email, f"{i:022d}"))


def batch(people: list[str]) -> list[dict]:
    events = []
    for i, email in enumerate(people):
        event, extra = KINDS[i % len(KINDS)]
        events.append({"email": email, "event": event, "sg_event_id": uuid.uuid4().hex, "timestamp": int(time.time()),
                       "message_id": f"{ISSUE}.0123456789.{i:022d}@example.com", **extra})
    return events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=9)
    parser.add_argument("--events", type=int, default=1000)
    args = parser.parse_args()
    key = ec.generate_private_key(ec.SECP256R1())
    public = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    n, runs = args.events, args.batches
    folder = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    try:
        people = [f"reader{i}@example.com" for i in range(n * (runs + 1))]
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        env.update({"NEWSLETTER_STORE_PATH": str(folder / "store.sqlite3"), "NEWSLETTER_SECRET": "bench",
                    "NEWSLETTER_WEBHOOKS_SENDGRID_PUBLIC_KEY": public})
        config = load_config(ROOT / "newsletter.toml", environ=env)
        prepare(config.store.path, people)
        server = subprocess.Popen([sys.executable, "-m", "newsletter", "serve", "--config", str(ROOT / "newsletter.toml"),
                                   "--host", "127.0.0.1", "--port", str(port)],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            times, changed = [], 0
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                for _ in range(200):
                    try:
                        if client.get("/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.05)
                else:
                    print("the service did not start:", server.stderr.read1().decode(errors="replace"))
                    return 2
                for run in range(runs):
                    body = json.dumps(batch(people[run * n:(run + 1) * n])).encode()
                    stamp = str(int(time.time()))
                    signature = base64.b64encode(key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()
                    headers = {"Content-Type": "application/json", "X-Twilio-Email-Event-Webhook-Signature": signature,
                               "X-Twilio-Email-Event-Webhook-Timestamp": stamp}
                    start = time.perf_counter()
                    answer = client.post("/webhooks/sendgrid", content=body, headers=headers)
                    times.append(time.perf_counter() - start)
                    if answer.status_code != 200 or answer.json()["events"] != n:
                        print(f"batch {run}: {answer.status_code} {answer.text}")
                        return 1
                    changed += answer.json()["changed"]
        finally:
            server.terminate()
            server.wait(10)
        kinds = {"bounce": HARD_BOUNCE, "spamreport": COMPLAINT, "unsubscribe": UNSUBSCRIBE}
        rest = people[runs * n:]
        local = [Event(SOFT_BOUNCE if e.get("type") == "blocked" else kinds[e["event"]], e["email"], "bench",
                       "", e["sg_event_id"], ISSUE) for e in batch(rest)]
        with Store(config.store.path) as store:
            start = time.perf_counter()
            store.record_events(local)
            in_process = time.perf_counter() - start
            recorded = store.db.execute("SELECT count(*) FROM events").fetchone()[0]
        median = statistics.median(times)
        print(f"batches of {n} signed SendGrid events, POSTed to `newsletter serve` on loopback ({runs} batches)")
        print(f"  median {median * 1000:.1f} ms a batch (min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}); "
              f"goal < 100 ms: {'met' if median < 0.1 else 'MISSED'}")
        print(f"  {n / median:,.0f} events committed a second (median batch); {changed:,} changed a subscriber")
        print(f"  in-process Store.record_events of {n} (one run, a cold process): {in_process * 1000:.1f} ms")
        print(f"  check: {recorded:,} events in the store (expected {n * (runs + 1):,})")
        return 0 if recorded == n * (runs + 1) else 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
