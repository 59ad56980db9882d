"""The unparsable-request warning is rate limited per method and counts the
lines it left out (a fake clock; the live behaviour is in
tests/api/test_garbage_bytes.py)."""

from __future__ import annotations

import logging

import pytest

from realm_service.api.parsing import _RateLimitedLog

GET = "/realm.v1.RealmService/GetRealm"
CLAIM = "/realm.v1.RealmService/ClaimJobs"


def test_one_line_per_method_per_interval_counting_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    limited = _RateLimitedLog(10.0, lambda: now[0])
    caplog.set_level(logging.WARNING, logger="realm_service.api.parsing")
    for step in range(10):  # 0.0 .. 9.0 s: one line
        now[0] = 100.0 + step
        limited(GET, "realm.v1.GetRealmRequest", "Wire format was corrupt")
    limited(CLAIM, "realm.v1.ClaimJobsRequest", "Wire format was corrupt")  # its own budget
    now[0] = 110.0
    limited(GET, "realm.v1.GetRealmRequest", "Wire format was corrupt")
    now[0] = 125.0
    limited(GET, "realm.v1.GetRealmRequest", "Wire format was corrupt")
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 4
    assert {r.getMessage() for r in caplog.records} == {"unparsable request"}
    fields = [(r.method, r.suppressed) for r in caplog.records]  # type: ignore[attr-defined]
    assert fields[0] == (GET, 0)
    assert fields[1] == (CLAIM, 0)
    assert fields[2] == (GET, 9)  # the nine within the first 10 s
    assert fields[3] == (GET, 0)
