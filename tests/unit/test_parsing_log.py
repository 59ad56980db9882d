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
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [logging.WARNING] * 4
    messages = [m for _, m in lines]
    assert messages[0].startswith(f"unparsable request method={GET} ")
    assert messages[0].endswith("suppressed=0")
    assert messages[1].startswith(f"unparsable request method={CLAIM} ")
    assert messages[2].endswith("suppressed=9")  # the nine within the first 10 s
    assert messages[3].endswith("suppressed=0")
