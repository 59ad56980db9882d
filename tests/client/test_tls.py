"""Both clients over TLS to a live server: trusted with the server's CA, refused
without it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import realm_client
from realm_client import AsyncRealmClient, RealmClient, RetryPolicy

from tests.api.test_tls import make_cert
from tests.client.live import live_server

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.02)


def test_tls_with_the_servers_ca(tmp_path: Path) -> None:
    key, cert = make_cert(tmp_path)
    ca = cert.read_bytes()

    async def async_calls(address: str) -> str:
        async with AsyncRealmClient(address, root_certificates=ca) as client:
            return (await client.get_realm("secure")).realm_id

    with live_server(tmp_path, tls_cert=str(cert), tls_key=str(key)) as live:
        with RealmClient(live.address, tls=True, root_certificates=ca) as client:
            assert client.create_realm("secure").realm.realm_id == "secure"
        assert asyncio.run(async_calls(live.address)) == "secure"
        # Plaintext, or TLS that does not trust the server's certificate: no channel.
        for options in ({}, {"tls": True}):
            with (
                RealmClient(live.address, retry=FAST, timeout=5, **options) as client,
                pytest.raises(realm_client.Unavailable),
            ):
                client.get_realm("secure")
