"""The dependency arrows of STYLE.md, checked by parsing imports:
api -> use cases -> store -> domain; only api touches grpc or generated
messages; only store touches SQLAlchemy; domain imports the standard library;
realm_service, index_worker and realmctl never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _starts(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package", ["realm_service", "index_worker", "realmctl"])
def test_packages_do_not_import_each_other(package: str) -> None:
    others = tuple(p for p in ("realm_service", "index_worker", "realmctl") if p != package)
    for path in modules(package):
        bad = [name for name in imports_of(path) if _starts(name, others)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_shared_package_imports_no_program() -> None:
    """realm_common (logs, settings, tracing, /metrics) is below both programs."""
    programs = ("realm_service", "index_worker", "realmctl", "realm_client")
    for path in modules("realm_common"):
        bad = [name for name in imports_of(path) if _starts(name, programs)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_domain_and_errors_use_only_the_standard_library() -> None:
    for name in ("domain.py", "errors.py", "clock.py"):
        path = ROOT / "realm_service" / name
        third_party = [
            n
            for n in imports_of(path)
            if not _starts(n, ("realm_service.errors", "realm_service.domain", "__future__"))
            and n.split(".")[0] not in __import__("sys").stdlib_module_names
        ]
        assert not third_party, f"{name} imports {third_party}"


def test_only_store_touches_sqlalchemy() -> None:
    for path in modules("realm_service"):
        rel = path.relative_to(ROOT / "realm_service").as_posix()
        if rel.startswith("store/"):
            continue
        bad = [n for n in imports_of(path) if _starts(n, ("sqlalchemy", "alembic", "psycopg"))]
        assert not bad, f"realm_service/{rel} imports {bad}"


def test_the_store_is_sealed() -> None:
    """Rows, state strings and the row mappers stay inside store/: the rest of
    the server gets domain values and hands on a `Tx`, nothing more."""
    private = ("realm_service.store.tables", "realm_service.store.rows")
    for path in modules("realm_service"):
        rel = path.relative_to(ROOT / "realm_service").as_posix()
        if rel.startswith("store/"):
            continue
        bad = [n for n in imports_of(path) if _starts(n, private)]
        assert not bad, f"realm_service/{rel} imports {bad}"


def test_the_store_works_on_core_connections() -> None:
    """The store's statements run on a Core connection: the ORM is only the
    table definitions' notation (tables.py) and the test helper's session
    (db.py), never a unit of work between a statement and its values."""
    allowed = {"store/tables.py", "store/db.py"}
    for path in modules("realm_service"):
        rel = path.relative_to(ROOT / "realm_service").as_posix()
        if rel in allowed:
            continue
        bad = [n for n in imports_of(path) if _starts(n, ("sqlalchemy.orm",))]
        assert not bad, f"realm_service/{rel} imports {bad}"


GRPC = ("grpc", "realm.v1", "google.protobuf")


@pytest.mark.parametrize("module", ["indexer.py", "gitignore.py", "model.py", "jobs.py"])
def test_the_workers_job_logic_knows_nothing_of_grpc(module: str) -> None:
    """Only the worker's client (and its converters) touch grpc and generated
    messages; indexing and job logic use the standard library, the
    worker's own modules and pathspec (the .gitignore matching)."""
    path = ROOT / "index_worker" / module
    bad = [
        n
        for n in imports_of(path)
        if not _starts(n, ("index_worker", "__future__", "pathspec"))
        and n.split(".")[0] not in __import__("sys").stdlib_module_names
    ]
    assert not bad, f"index_worker/{module} imports {bad}"


def test_only_the_workers_client_touches_grpc() -> None:
    for path in modules("index_worker"):
        if path.name in ("client.py", "convert.py"):
            continue
        bad = [n for n in imports_of(path) if _starts(n, GRPC)]
        assert not bad, f"index_worker/{path.name} imports {bad}"


def test_only_api_and_server_touch_grpc() -> None:
    for path in modules("realm_service"):
        rel = path.relative_to(ROOT / "realm_service").as_posix()
        if rel.startswith("api/") or rel in ("server.py",):
            continue
        bad = [
            n
            for n in imports_of(path)
            if _starts(n, ("grpc", "grpc_health", "grpc_reflection", "realm.v1", "google.protobuf"))
        ]
        assert not bad, f"realm_service/{rel} imports {bad}"


def test_store_does_not_import_use_cases_or_api() -> None:
    for path in modules("realm_service/store"):
        bad = [
            n
            for n in imports_of(path)
            if _starts(
                n,
                (
                    "realm_service.api",
                    "realm_service.queue",
                    "realm_service.realms",
                    "realm_service.dispatcher",
                    "realm_service.server",
                ),
            )
        ]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
