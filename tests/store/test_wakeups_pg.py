"""Wake-ups between PostgreSQL instances: a claim that locked claimable jobs
it had no room for tells the other instances to look again, and only them:
not its own dispatcher (it knows), and nobody when no other instance is
alive (the NOTIFY would be heard by no one). An instance that starts
introduces itself, so the others talk to it before their next refresh."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta

import psycopg

from realm_service.domain import USER, JobKind
from realm_service.queue import JobQueue, QueueSettings
from realm_service.store.db import Database, open_database
from tests.store.test_concurrency_pg import create_realms


def _heard(event: threading.Event, seconds: float) -> bool:
    return event.wait(seconds)


def _words_sent(db: Database, action: Callable[[], object]) -> list[str]:
    """The payloads on the instances' channel while `action` runs."""
    conninfo = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'LISTEN "{db.channel}"')
        action()
        return [n.payload for n in conn.notifies(timeout=0.5)]


def test_an_enqueue_tells_other_instances_while_there_are_any(pg_url: str) -> None:
    db_a, db_b = open_database(pg_url), open_database(pg_url, migrate=False)
    try:
        a, b = JobQueue(db_a), JobQueue(db_b)
        a.register_instance()
        b.register_instance()
        create_realms(db_a, ["w1", "w2"])
        a.touch_instance()
        assert db_a.others_alive
        assert _words_sent(db_a, lambda: a.enqueue("w1", JobKind.FROM_SCRATCH, USER)) == [
            db_a.origin
        ]
        b.unregister_instance()
        a.touch_instance()
        assert not db_a.others_alive
        assert _words_sent(db_a, lambda: a.enqueue("w2", JobKind.FROM_SCRATCH, USER)) == []
    finally:
        db_a.close()
        db_b.close()


def test_a_claim_with_leftovers_wakes_the_other_instances_only(pg_url: str) -> None:
    settings = QueueSettings(instance_timeout=timedelta(seconds=30))
    db_a, db_b = open_database(pg_url), open_database(pg_url, migrate=False)
    try:
        a = JobQueue(db_a, settings=settings)
        b = JobQueue(db_b, settings=settings)
        heard_a, heard_b = threading.Event(), threading.Event()
        a.on_new_work(heard_a.set)
        b.on_new_work(heard_b.set)
        a.register_instance()
        time.sleep(1.0)  # both listening; their connect-time wake-ups pass
        a.touch_instance()
        assert not db_a.others_alive  # B has no row yet: A is alone
        b.register_instance()  # B introduces itself: A hears before refreshing
        deadline = time.monotonic() + 5.0
        while not db_a.others_alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert db_a.others_alive, "A did not learn of B from its introduction"
        realms = [f"r{i}" for i in range(6)]
        create_realms(db_a, realms)
        for realm in realms:
            a.enqueue(realm, JobKind.FROM_SCRATCH, priority=USER)
        time.sleep(1.0)
        heard_a.clear()
        heard_b.clear()

        # Both alive: A's claim of 1 leaves claimable jobs locked; B hears.
        b.touch_instance()
        a.touch_instance()
        assert db_a.others_alive
        assert len(a.claim(1, worker="w")) == 1
        assert _heard(heard_b, 5.0), "the other instance was not told to look again"
        assert not heard_a.is_set(), "a claim woke its own dispatcher through NOTIFY"

        # B stops refreshing its row and is taken for dead: A stays quiet.
        db_b.close()
        settings_short = QueueSettings(instance_timeout=timedelta(milliseconds=1))
        a_alone = JobQueue(db_a, settings=settings_short)
        a_alone.instance_id = a.instance_id
        time.sleep(0.05)
        a_alone.touch_instance()
        assert not db_a.others_alive
        heard_a.clear()
        assert len(a.claim(1, worker="w")) == 1
        assert not _heard(heard_a, 1.0)
    finally:
        db_a.close()
        db_b.close()


def test_a_word_heard_during_a_refresh_outweighs_its_alone(pg_url: str) -> None:
    """A refresh that found no other instance must not undo what a word heard
    meanwhile taught (an instance that started during the refresh)."""
    db = open_database(pg_url)
    try:
        db.set_others_alive(False)
        heard = db.words_heard
        db._notified("work:another-instance")  # an introduction, mid-refresh
        assert db.others_alive
        db.set_others_alive(False, heard_before=heard)
        assert db.others_alive  # the refresh began before the word
        db.set_others_alive(False, heard_before=db.words_heard)
        assert not db.others_alive
    finally:
        db.close()


def _until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_the_listener_asks_who_else_is_there_as_soon_as_it_listens(pg_url: str) -> None:
    """Until a refresh, an instance assumes company (its enqueues take the
    shared path); once LISTEN holds, it asks at once rather than at its next
    health refresh, so a lone instance goes its own way from the start, and
    one with company keeps talking."""
    settings = QueueSettings(instance_timeout=timedelta(seconds=30))
    db_a, db_b = open_database(pg_url), open_database(pg_url, migrate=False)
    try:
        a = JobQueue(db_a, settings=settings)
        a.register_instance()
        assert db_a.others_alive  # assumed until asked
        a.on_new_work(lambda: None)  # starts the listener; no touch_instance here
        assert _until(lambda: not db_a.others_alive, 5.0), "a lone instance never learned it"

        b = JobQueue(db_b, settings=settings)
        b.register_instance()
        assert _until(lambda: db_a.others_alive, 5.0)  # B's introduction
        # Called after B's question (its queue's callback came first): a
        # question that missed A's row would leave B taking itself for alone.
        answered: list[bool] = []
        db_b.on_listening(lambda: answered.append(db_b.others_alive))
        b.on_new_work(lambda: None)
        assert _until(lambda: bool(answered), 5.0)  # B listens and asked
        assert answered == [True], "B found A's row yet took itself for alone"
    finally:
        db_a.close()
        db_b.close()
