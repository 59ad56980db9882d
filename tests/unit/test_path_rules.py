"""domain.validate_path's rules (DESIGN.md section 3, "Files") where the wire
cannot reach them, and the realm id's trailing newline."""

from __future__ import annotations

import pytest

from realm_service.domain import (
    MAX_PATH_LENGTH,
    check_client_delete,
    check_client_write,
    check_initial_file,
    validate_path,
    validate_realm_id,
)
from realm_service.errors import InvalidArgument


@pytest.mark.parametrize("rid", ["abc\n", "b" * 63 + "\n", "a\nb", "\nabc"])
def test_a_newline_never_passes_as_part_of_a_realm_id(rid: str) -> None:
    with pytest.raises(InvalidArgument, match="realm_id"):
        validate_realm_id(rid)


def test_the_nfc_form_is_returned() -> None:
    assert validate_path("docs/cafe\u0301.json") == "docs/caf\u00e9.json"
    assert validate_path("docs/caf\u00e9.json") == "docs/caf\u00e9.json"
    # Compatibility forms are distinct names: NFC, not NFKC.
    assert validate_path("\ufb01le.txt") == "\ufb01le.txt"


@pytest.mark.parametrize("cp", [0xD800, 0xDFFF])
def test_an_unpaired_surrogate_is_refused(cp: int) -> None:
    with pytest.raises(InvalidArgument, match=f"path contains U\\+{cp:04X} \\(an unpaired"):
        validate_path(f"a{chr(cp)}b")


def test_the_code_point_is_reported_as_sent_and_where() -> None:
    with pytest.raises(InvalidArgument) as e:
        validate_path("e\u0301/\u202e.txt", "initial_files[3].path")
    assert e.value.message.startswith("initial_files[3].path contains U+202E")
    assert "at character 2" in e.value.message  # counted in the NFC path


@pytest.mark.parametrize("cp", [0x20, 0xA0, 0x200B, 0x200D, 0x1F600, 0xFFFD, 0x10FFFD])
def test_other_code_points_pass(cp: int) -> None:
    assert validate_path(f"a{chr(cp)}b") == f"a{chr(cp)}b"


def test_the_length_counts_the_normalized_path() -> None:
    nfd = "e\u0301" * 200  # 600 bytes; 400 in NFC
    # 1201 bytes as sent, 801 as stored: it fits.
    assert validate_path(f"{nfd}/{nfd}") == "/".join(["\u00e9" * 200] * 2)
    with pytest.raises(InvalidArgument, match=f"longer than {MAX_PATH_LENGTH} bytes"):
        validate_path(f"{nfd}/{nfd}/{nfd}")  # 1202 bytes in NFC
    with pytest.raises(InvalidArgument, match=f"longer than {MAX_PATH_LENGTH} bytes"):
        validate_path("a" * 5_000_000)


def test_reserved_names() -> None:
    check_client_write("index.json")
    check_client_write("docs/realm.json")  # reserved only at the root
    check_client_delete("docs/index.json")
    with pytest.raises(InvalidArgument, match=r"^path: realm.json is reserved: "):
        check_client_write("realm.json")
    for path in ("realm.json", "index.json"):
        with pytest.raises(InvalidArgument, match=f"^path: {path} is reserved: "):
            check_client_delete(path)
        with pytest.raises(
            InvalidArgument, match=f"^initial_files\\[0\\].path: {path} is reserved"
        ):
            check_initial_file(path, "initial_files[0].path")
