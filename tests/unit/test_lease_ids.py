"""Lease ids: unguessable fencing tokens whose order follows the claims'."""

from __future__ import annotations

import re
import time

from realm_service.store.claim_sql import new_lease_id

MASK = 0xFF_FFFF_FFFF


def test_a_lease_id_is_32_hex_digits_led_by_its_millisecond() -> None:
    before = time.time_ns() // 1_000_000 & MASK
    lease_id = new_lease_id()
    after = time.time_ns() // 1_000_000 & MASK
    assert re.fullmatch("[0-9a-f]{32}", lease_id)
    assert before <= int(lease_id[:10], 16) <= after or after < before  # (at a wrap)


def test_ids_made_in_turn_sort_in_turn_and_differ_in_their_random_part() -> None:
    ids = []
    for _ in range(5):
        ids.extend(new_lease_id() for _ in range(200))
        time.sleep(0.002)
    prefixes = [i[:10] for i in ids]
    assert prefixes == sorted(prefixes) and len(set(prefixes)) >= 5
    assert len({i[10:] for i in ids}) == len(ids)  # 88 random bits each
