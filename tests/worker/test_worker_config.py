"""Worker settings: flags over INDEX_WORKER_* variables over defaults, checked at start."""

from __future__ import annotations

import os

import pytest

from index_worker.config import ConfigError, WorkerConfig, load_config
from index_worker.model import JobKind


def test_defaults_with_only_a_server() -> None:
    config = load_config(["--server", "127.0.0.1:50051"], {})
    assert config.server == "127.0.0.1:50051"
    assert config.concurrency == 2
    assert config.batch_size == 500
    assert config.min_priority is None
    assert config.kinds == ()
    assert config.token is None
    assert (config.reconnect_backoff_base, config.reconnect_backoff_max) == (0.1, 5.0)
    assert config.drain_timeout == 30.0
    assert config.noop_for_benchmarks is False
    assert config.worker_id.endswith(f"-{os.getpid()}")


def test_environment_is_read_and_flags_win() -> None:
    env = {
        "INDEX_WORKER_SERVER": "env:1",
        "INDEX_WORKER_TOKEN": "s3cret",
        "INDEX_WORKER_CONCURRENCY": "4",
        "INDEX_WORKER_MIN_PRIORITY": "10",
        "INDEX_WORKER_KINDS": "incremental, from-scratch",
        "INDEX_WORKER_NOOP_FOR_BENCHMARKS": "yes",
        "INDEX_WORKER_WORKER_ID": "pod-7",
    }
    config = load_config(["--concurrency", "8"], env)
    assert config.server == "env:1"
    assert config.token == "s3cret"
    assert config.concurrency == 8
    assert config.min_priority == 10
    assert config.kinds == (JobKind.INCREMENTAL, JobKind.FROM_SCRATCH)
    assert config.noop_for_benchmarks is True
    assert config.worker_id == "pod-7"


def test_kinds_flag_takes_several_values() -> None:
    config = load_config(["--server", "s:1", "--kinds", "from-scratch", "incremental"], {})
    assert config.kinds == (JobKind.FROM_SCRATCH, JobKind.INCREMENTAL)


@pytest.mark.parametrize(
    ("argv", "env", "name"),
    [
        ([], {}, "INDEX_WORKER_SERVER"),
        (["--server", "s:1"], {"INDEX_WORKER_CONCURRENCY": "two"}, "INDEX_WORKER_CONCURRENCY"),
        (["--server", "s:1", "--concurrency", "0"], {}, "--concurrency"),
        (["--server", "s:1"], {"INDEX_WORKER_MIN_PRIORITY": "101"}, "INDEX_WORKER_MIN_PRIORITY"),
        (["--server", "s:1"], {"INDEX_WORKER_BATCH_SIZE": "1001"}, "INDEX_WORKER_BATCH_SIZE"),
        (["--server", "s:1", "--kinds", "reindex"], {}, "--kinds"),
        (["--server", "s:1"], {"INDEX_WORKER_NOOP_FOR_BENCHMARKS": "maybe"}, "NOOP_FOR"),
        (["--server", "s:1"], {"INDEX_WORKER_DRAIN_TIMEOUT": "-1"}, "INDEX_WORKER_DRAIN_TIMEOUT"),
        (["--server", "s:1"], {"INDEX_WORKER_PING_TIMEOUT": "nan"}, "INDEX_WORKER_PING_TIMEOUT"),
        (["--server", "s:1", "--reconnect-backoff-max", "0.01"], {}, "--reconnect-backoff-max"),
        (["--server", "s:1", "--log-level", "loud"], {}, "--log-level"),
    ],
)
def test_bad_values_fail_fast_naming_the_setting(
    argv: list[str], env: dict[str, str], name: str
) -> None:
    with pytest.raises(ConfigError, match=name):
        load_config(argv, env)


def test_config_is_frozen() -> None:
    config = WorkerConfig(server="s:1", worker_id="w")
    with pytest.raises(AttributeError):
        config.concurrency = 3  # type: ignore[misc]
