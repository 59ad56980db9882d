"""One log format for every program: one line per record, fields as keys.

logfmt by default, JSON with `json_lines=True`:

    time=2026-12-05T07:37:23.590Z level=info logger=realm_service.dispatcher
        msg="job running" job=29 realm=notes lease=l-3 worker=w1   (one line)
    {"time": "2026-12-05T07:37:23.590Z", "level": "info", "msg": "job running", "job": 29}

The standard library's logging, with this one formatter on the root handler,
rather than structlog: every module already logs through
`logging.getLogger(__name__)`, and so do grpc, SQLAlchemy and Alembic, so
their records come out in the same format with no bridge; and a record's
fields are what callers pass as `extra=`, which costs nothing when the level
is off. Times are UTC, RFC 3339 with milliseconds. A traceback goes into the
`exc` field, so a record is always exactly one line, with one exception: a
record whose `extra=` has `each` (a list of field dicts) stands for one line
per item, each with the record's other fields too. A batch of 64 jobs
starting is then one record, one formatting pass and one write, and still
64 lines that each name their job (`job running job=29 ...`); handlers other
than this formatter see one record with the list.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


EACH = "each"  # an `extra=` field: one line per item of this list of dicts


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record carries besides its message (from `extra=`)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


def _items(fields: dict[str, Any]) -> list[dict[str, Any]] | None:
    items = fields.pop(EACH, None)
    return items if isinstance(items, list) and items else None


def _time(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        head: list[tuple[str, object]] = [
            ("time", _time(record)),
            ("level", record.levelname.lower()),
            ("logger", record.name),
            ("msg", record.getMessage()),
        ]
        fields = record_fields(record)
        items = _items(fields)
        tail = list(fields.items())
        if record.exc_info:
            tail.append(("exc", self.formatException(record.exc_info)))
        if items is None:
            return _logfmt([*head, *tail])
        start, end = _logfmt(head), _logfmt(tail)
        sep = " " if end else ""
        return "\n".join(f"{start} {_logfmt(item.items())}{sep}{end}" for item in items)


def _logfmt(pairs: Any) -> str:
    return " ".join(f"{key}={logfmt_value(value)}" for key, value in pairs)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = record_fields(record)
        items = _items(fields)
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if items is None:
            out.update(fields)
            return json.dumps(out, default=str)
        return "\n".join(json.dumps({**out, **item, **fields}, default=str) for item in items)


_QUOTED = re.compile(r'[ "=\\]')


def logfmt_value(value: object) -> str:
    if type(value) is int:
        return str(value)
    text = str(value)
    if text and text.isprintable() and _QUOTED.search(text) is None:
        return text
    return json.dumps(text)


def parse_logfmt(line: str) -> dict[str, str]:
    """The fields of one logfmt line (what `LogfmtFormatter` writes)."""
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        eq = line.find("=", i)
        if eq < 0:
            break
        key = line[i:eq]
        i = eq + 1
        if i < n and line[i] == '"':
            value, end = json.JSONDecoder().raw_decode(line, i)
            out[key] = value
            i = end
        else:
            end = line.find(" ", i)
            end = n if end < 0 else end
            out[key] = line[i:end]
            i = end
    return out


def configure_logging(level: str, *, json_lines: bool = False) -> None:
    """The root handler on stderr with the one format; called once by each
    program's `__main__`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that are chatty at INFO: grpc during reconnects, Alembic
    # with a line per migration step at every start.
    for name in ("grpc", "alembic"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
