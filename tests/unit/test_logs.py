"""The one log format: fields as keys, UTC RFC 3339 times, one line per
record (a traceback included), logfmt or JSON."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime

from realm_common.logs import JsonFormatter, LogfmtFormatter, parse_logfmt


def record(msg: str = "job running", exc: bool = False, **fields: object) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("broken\nacross lines")
        except ValueError:
            info = sys.exc_info()
    rec = logging.LogRecord("realm_service.dispatcher", logging.INFO, __file__, 1, msg, (), info)
    rec.created = 1796456243.59  # 2026-12-05T07:37:23.590Z
    for key, value in fields.items():
        setattr(rec, key, value)
    return rec


def test_logfmt_puts_fields_as_keys_with_a_utc_time() -> None:
    line = LogfmtFormatter().format(
        record(job=29, realm="notes", lease="l-1", worker="w 1", note='say "hi"')
    )
    assert line.startswith("time=2026-12-05T07:37:23.590Z level=info ")
    fields = parse_logfmt(line)
    assert datetime.fromisoformat(fields["time"]).utcoffset() is not None
    assert fields["msg"] == "job running"
    assert fields["job"] == "29" and fields["realm"] == "notes" and fields["lease"] == "l-1"
    assert fields["worker"] == "w 1" and fields["note"] == 'say "hi"'


def test_a_traceback_stays_on_the_line() -> None:
    for formatter in (LogfmtFormatter(), JsonFormatter()):
        line = formatter.format(record("job failed", exc=True, job=3))
        assert "\n" not in line
    fields = parse_logfmt(LogfmtFormatter().format(record("job failed", exc=True)))
    assert "ValueError: broken\nacross lines" in fields["exc"]


def test_json_keeps_field_types() -> None:
    out = json.loads(JsonFormatter().format(record(job=29, realm="notes", attempt=2)))
    assert out == {
        "time": "2026-12-05T07:37:23.590Z",
        "level": "info",
        "logger": "realm_service.dispatcher",
        "msg": "job running",
        "job": 29,
        "realm": "notes",
        "attempt": 2,
    }


def test_a_batch_record_is_one_line_per_item_with_the_shared_fields() -> None:
    """`extra={"each": [...]}`: one record for a batch of jobs, still one
    line per job, each carrying the record's other fields after its own."""
    items = [{"job": 29, "realm": "notes"}, {"job": 30, "realm": "my realm"}]
    text = LogfmtFormatter().format(record(each=items, worker="w1", stream="w1/s1"))
    lines = [parse_logfmt(line) for line in text.split("\n")]
    assert [(f["msg"], f["job"], f["realm"], f["worker"]) for f in lines] == [
        ("job running", "29", "notes", "w1"),
        ("job running", "30", "my realm", "w1"),
    ]
    assert all(f["time"] == "2026-12-05T07:37:23.590Z" and "each" not in f for f in lines)
    out = [json.loads(line) for line in JsonFormatter().format(record(each=items)).split("\n")]
    assert [(o["msg"], o["job"]) for o in out] == [("job running", 29), ("job running", 30)]
    # An empty or malformed list is an ordinary field-less record.
    assert "\n" not in LogfmtFormatter().format(record(each=[], job=1))


def test_the_fault_matrix_still_finds_logged_tracebacks() -> None:
    """scripts/fault_matrix.py reports tracebacks in the programs' logs; in
    the one-line format they are in the `exc` field of either format."""
    from tests.faults.driver import _tracebacks

    log = "\n".join(
        [
            LogfmtFormatter().format(record("fine")),
            LogfmtFormatter().format(record("job failed", exc=True)),
            JsonFormatter().format(record("job failed", exc=True)),
        ]
    )
    (found,) = _tracebacks(log)
    assert "ValueError: broken" in found and "(seen 2 times)" in found
