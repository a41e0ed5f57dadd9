"""A send killed with SIGKILL at random moments, over and over, and resumed each time
(bench/kills.py does the rounds: `newsletter send` processes against a counting SMTP
server in another process). Nothing is lost, nothing doubled, and no more rows are left
uncertain by a kill than there were messages in flight (one a connection)."""

import importlib.util
import random
import sys

import pytest

from conftest import ROOT

KILLS_NORMAL, RECIPIENTS_NORMAL = 5, 300  # the normal suite
KILLS_SLOW, RECIPIENTS_SLOW = 50, 3000  # `pytest -m slow`
KILLS_API = 5  # against the Resend stand-in, whose Idempotency-Key makes a resend harmless
KILLS_PG = 5  # over SMTP, the ledger in PostgreSQL
CONNECTIONS = 4


def bench():
    spec = importlib.util.spec_from_file_location("kills", ROOT / "bench" / "kills.py")
    module = sys.modules.setdefault("kills", importlib.util.module_from_spec(spec))
    if not hasattr(module, "run"):
        spec.loader.exec_module(module)
    return module


def assert_nothing_lost_or_doubled(figures, kills, recipients, connections=CONNECTIONS):
    assert figures.problems == [], figures.problems[:10]
    assert figures.kills == kills
    assert figures.duplicates == 0 and figures.lost == 0
    assert figures.delivered_once + figures.uncertain == figures.issues * recipients
    assert figures.most_in_flight <= connections


def test_killed_sends_resumed_lose_and_double_nobody(tmp_path):
    figures = bench().run(KILLS_NORMAL, RECIPIENTS_NORMAL, CONNECTIONS, max_delay=1.5, seed=12, folder=tmp_path)
    assert_nothing_lost_or_doubled(figures, KILLS_NORMAL, RECIPIENTS_NORMAL)
    assert figures.where["mid-send"] >= 1  # the seed puts kills in the middle of sends


def test_killed_api_sends_resent_under_the_same_idempotency_keys_reach_everyone_once(tmp_path):
    kills = bench()
    figures = kills.run(KILLS_API, RECIPIENTS_NORMAL, 2, backend="resend", max_delay=2.0, seed=5, folder=tmp_path)
    assert_nothing_lost_or_doubled(figures, KILLS_API, RECIPIENTS_NORMAL, connections=2 * kills.API_BATCH)
    assert figures.uncertain == 0  # every one resent, and answered from its key


def test_killed_sends_on_a_postgresql_store_lose_and_double_nobody(tmp_path, pg_server, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", pg_server.env()["PGPASSWORD"])  # the send processes' password
    figures = bench().run(KILLS_PG, RECIPIENTS_NORMAL, CONNECTIONS, max_delay=1.5, seed=12, folder=tmp_path,
                          store_url=pg_server.new_database())
    assert_nothing_lost_or_doubled(figures, KILLS_PG, RECIPIENTS_NORMAL)
    assert figures.where["mid-send"] >= 1


@pytest.mark.slow
def test_fifty_kills_in_a_row(tmp_path):
    seed = random.randrange(1 << 30)  # new kill moments each time; the seed to replay them
    figures = bench().run(KILLS_SLOW, RECIPIENTS_SLOW, CONNECTIONS, max_delay=2.5, seed=seed, folder=tmp_path)
    assert_nothing_lost_or_doubled(figures, KILLS_SLOW, RECIPIENTS_SLOW)
    assert figures.where["start-up"] and figures.where["mid-send"], (seed, figures.where)
