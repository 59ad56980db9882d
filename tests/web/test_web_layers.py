"""The console is a front door beside api/, not a second path to the store:
it imports the use cases (queue, realms, explain) and never the store,
SQLAlchemy or the servicer."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_layers import imports_of

WEB = Path(__file__).resolve().parents[2] / "realm_service" / "web"
FORBIDDEN = ("realm_service.store", "sqlalchemy", "realm_service.api.servicer")


def test_the_console_reaches_the_store_only_through_the_use_cases() -> None:
    modules = sorted(WEB.rglob("*.py"))
    assert len(modules) >= 3
    for path in modules:
        bad = [n for n in imports_of(path) if n.startswith(FORBIDDEN)]
        assert not bad, f"{path.name} imports {bad}"
    app = imports_of(WEB / "app.py")
    assert {"realm_service.explain", "realm_service.errors"} <= app
