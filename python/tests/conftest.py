"""What several test files share: the malformed-file corpus."""

import pytest


def malformed(ok: bytes) -> dict:
    """Malformed files made from ``ok`` (a valid file holding one F32 tensor of shape [3]),
    by the rule each breaks (the error kind it must raise)."""
    n = int.from_bytes(ok[:8], "little")
    header, data = ok[8 : 8 + n], ok[8 + n :]
    return {
        "HeaderTooSmall": b"\x01\x02",
        "HeaderTooLarge": (200_000_000).to_bytes(8, "little") + b"{}",
        "InvalidHeaderLength": (100).to_bytes(8, "little") + b"{}",
        "InvalidJson": (3).to_bytes(8, "little") + b"{x}",
        "IncompleteBuffer": ok + b"\x00",
        "SizeMismatch": ok[:8] + header.replace(b"[3]", b"[2]") + data,
        "UnknownDtype": ok[:8] + header.replace(b'"F32"', b'"F33"') + data,
    }


@pytest.fixture
def malformed_files():
    """:func:`malformed`, for a test to call with its framework's valid file."""
    return malformed
