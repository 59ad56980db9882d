"""A realm's index card, built from a template, is byte for byte what
`json.dumps(..., indent=2)` of its value gives, whatever the realm's name."""

from __future__ import annotations

import json

import pytest

from realm_service.realms import _index_card_value, index_card


@pytest.mark.parametrize(
    "name",
    ["Docs", "", 'a "quoted" {brace} name', "é ü 漢字 🙂", "\\0", "\x00\n\t", "Index of x"],
)
def test_the_index_card_is_its_value_dumped(name: str) -> None:
    card = index_card(name)
    assert card == json.dumps(_index_card_value(name), indent=2).encode()
    data = json.loads(card)["data"]
    assert data["attributes"] == {"title": name, "description": f"Index of {name}"}
