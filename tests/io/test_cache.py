"""Tests for lmforge.io.cache: pinned bytes travel once; a corrupt entry is fetched again."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from download_fixtures import (  # noqa: F401 (server, splits, wikitext_zip: fixtures)
    FAST, assert_nothing_left, assert_output, server, sha, splits, wikitext_zip,
)

from lmforge.data.download import download_corpus
from lmforge.io.cache import entry, find, keep


# ------------------------------------------------------------------ through the download stage


def test_cache_hit_makes_no_request(server, splits, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    cache = tmp_path / "cache"
    pins = {"sha256": sha(wikitext_zip), "size": len(wikitext_zip)}
    first = download_corpus(server.url("/w.zip"), tmp_path / "a", cache_dir=cache, **pins, **FAST)
    assert (cache / "sha256" / sha(wikitext_zip)).read_bytes() == wikitext_zip
    assert list((cache / "sha256").iterdir()) == [cache / "sha256" / sha(wikitext_zip)]
    assert len(server.requests) == 1

    second = download_corpus(server.url("/w.zip"), tmp_path / "b", cache_dir=cache, **pins, **FAST)
    assert len(server.requests) == 1
    assert second == first
    assert_output(tmp_path / "b", splits, second)
    assert_nothing_left(tmp_path, {"a", "b", "cache"})

def test_corrupt_cache_entry_is_downloaded_again(server, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    entry = tmp_path / "cache" / "sha256" / sha(wikitext_zip)
    entry.parent.mkdir(parents=True)
    entry.write_bytes(wikitext_zip[:100])  # a writer killed halfway
    download_corpus(server.url("/w.zip"), tmp_path / "out", sha256=sha(wikitext_zip), cache_dir=tmp_path / "cache", **FAST)
    assert len(server.requests) == 1
    assert entry.read_bytes() == wikitext_zip


# ------------------------------------------------------------------ the cache itself


def test_find_needs_a_pin_and_an_intact_entry(tmp_path):
    cache = tmp_path / "cache"
    data = b"pinned bytes\n"
    assert find(None, sha(data)) is None and find(cache, None) is None
    assert find(cache, sha(data)) is None  # nothing cached yet; nothing created either
    assert not cache.exists()
    path = entry(cache, sha(data))
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    assert find(cache, sha(data), len(data)) == path
    assert find(cache, sha(data), len(data) + 1) is None  # the size pin disagrees: removed
    assert not path.exists()


def test_keep_moves_the_file_in_under_its_digest(tmp_path):
    src = tmp_path / "download"
    src.write_bytes(b"abc")
    keep(src, tmp_path / "cache", sha(b"abc"))
    assert not src.exists()
    assert (tmp_path / "cache" / "sha256" / sha(b"abc")).read_bytes() == b"abc"


def test_keep_across_filesystems_copies_then_renames(tmp_path, monkeypatch):
    # os.replace fails with EXDEV between filesystems (a scratch volume and a cache volume).
    src = tmp_path / "download"
    src.write_bytes(b"abc" * 1000)
    real_replace = os.replace

    def replace(a, b):
        if Path(a) == src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    keep(src, tmp_path / "cache", sha(b"abc" * 1000))
    assert not src.exists()
    assert sorted(p.name for p in (tmp_path / "cache" / "sha256").iterdir()) == [sha(b"abc" * 1000)]
    assert (tmp_path / "cache" / "sha256" / sha(b"abc" * 1000)).read_bytes() == b"abc" * 1000


def test_a_cache_that_cannot_be_written_costs_only_a_warning(tmp_path, caplog):
    src = tmp_path / "download"
    src.write_bytes(b"abc")
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level("WARNING", logger="lmforge.io.cache"):
        keep(src, blocked, sha(b"abc"))
    assert "could not keep" in caplog.text and src.read_bytes() == b"abc"
