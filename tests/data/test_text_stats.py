"""Tests for lmforge.data.text_stats: counts as fairseq reads text, UTF-8 errors at their exact offset."""

from __future__ import annotations

import pytest

from lmforge.data.text_stats import TextStats
from download_fixtures import sha


def text_stats(data: bytes) -> dict:
    """TextStats of a whole byte string, fed in one chunk."""
    stats = TextStats()
    stats.update(data)
    return stats.finish()

def test_text_stats_counts_like_fairseq_reads():
    # Python text mode splits \n, \r\n and \r; a last line without newline still counts.
    assert text_stats(b"a b\r\nc\rd e f") == {
        "sha256": sha(b"a b\r\nc\rd e f"),
        "bytes": 12,
        "lines": 3,
        "tokens": 2 + 1 + 1 + 1 + 3 + 1,
    }
    assert text_stats(b"") == {"sha256": sha(b""), "bytes": 0, "lines": 0, "tokens": 0}
    assert text_stats(b" \n\n")["tokens"] == 2  # empty lines: an end-of-sentence each

@pytest.mark.parametrize("step", [1, 2, 3, 1000])
def test_text_stats_chunking_and_utf8_offsets(step):
    def fed_in_chunks(data: bytes) -> dict:
        stats = TextStats()
        for i in range(0, len(data), step):
            stats.update(data[i : i + step])
        return stats.finish()

    data = "héllo wörld\r\n€ x\r".encode() * 3 + b"tail"
    assert fed_in_chunks(data) == text_stats(data)

    with pytest.raises(Exception) as err:
        fed_in_chunks("€€".encode() + b"\xff" + b"more")
    assert err.value.offset == 6

    with pytest.raises(Exception) as err:
        fed_in_chunks("ab€".encode()[:-1])  # an incomplete last character
    assert err.value.offset == 2
