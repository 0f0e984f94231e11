"""Tests for lmforge.data.catalog and catalog names in download_corpus (real HTTP servers on 127.0.0.1).

Nothing here reaches the internet: the official locations are only checked as
strings; downloads go to catalog entries (or location lists) pointed at 127.0.0.1.
"""

from __future__ import annotations

import re
import time

import pytest
from download_fixtures import FAST, Server, assert_nothing_left, assert_output, dead_url, make_zip, sha, wikitext_layout

from lmforge.data import catalog
from lmforge.data.catalog import CATALOG, CatalogEntry, format_catalog, list_corpora, lookup, suggest
from lmforge.data.download import Unreachable, download_corpus
from lmforge.errors import IntegrityError, LmforgeError

from conftest import WIKITEXT_DIR, corpus_text

README = WIKITEXT_DIR.parent / "README.md"
OFFLINE = "offline? pass a local corpus with --corpus DIR (train.txt, valid.txt, test.txt)"


def published_pins() -> dict[str, tuple[int, str]]:
    """archive -> (bytes, sha256) from the table in shared/data/README.md."""
    if not README.is_file():
        pytest.skip(f"{README} not found")
    rows = re.findall(r"^\|\s*(wikitext-[\w-]+\.zip)\s*\|\s*([\d,]+)\s*\|\s*([0-9a-f]{64})\s*\|", README.read_text(), re.M)
    return {name: (int(size.replace(",", "")), digest) for name, size, digest in rows}


# ------------------------------------------------------------------ the catalog itself


def test_every_entry_matches_the_published_pins():
    pins = published_pins()
    assert len(pins) == 4
    assert sorted(e.archive for e in CATALOG.values()) == sorted(pins)
    for entry in CATALOG.values():
        assert (entry.size, entry.sha256) == pins[entry.archive], entry.name
        assert catalog.check_entry(entry) == []


@pytest.mark.parametrize(
    "name, archive, folder, ext",
    [
        ("wikitext-2", "wikitext-2-v1.zip", "wikitext-2", "tokens"),
        ("wikitext-2-raw", "wikitext-2-raw-v1.zip", "wikitext-2-raw", "raw"),
        ("wikitext-103", "wikitext-103-v1.zip", "wikitext-103", "tokens"),
        ("wikitext-103-raw", "wikitext-103-raw-v1.zip", "wikitext-103-raw", "raw"),
    ],
)
def test_entry_layout_and_locations(name, archive, folder, ext):
    e = CATALOG[name]
    assert e.archive == archive
    assert dict(e.members) == {s: f"{folder}/wiki.{s}.{ext}" for s in ("train", "valid", "test")}
    assert e.locations == (
        f"https://wikitext.smerity.com/{archive}",
        f"https://s3.amazonaws.com/research.metamind.io/wikitext/{archive}",
    )


def test_list_and_format():
    names = [e.name for e in list_corpora()]
    assert names == ["wikitext-103", "wikitext-103-raw", "wikitext-2", "wikitext-2-raw"]
    text = format_catalog(list_corpora())
    for e in CATALOG.values():
        assert e.name in text and e.sha256 in text and all(loc in text for loc in e.locations)
    assert "4.3 MiB" in text and "181.4 MiB" in text
    assert format_catalog([]) == "no corpora in the catalog"


def test_lookup_takes_bare_names_only():
    assert lookup("wikitext-2") is CATALOG["wikitext-2"]
    for not_a_name in ["./wikitext-2", "data/wikitext-2", "file:wikitext-2", "wikitext-3"]:
        assert lookup(not_a_name) is None
    assert suggest("wikitext2") == "wikitext-2" and suggest("WikiText-103") == "wikitext-103"
    assert suggest("my-corpus") is None
    assert suggest("wikitext_2") == "wikitext-2"  # what download_corpus offers for a missing path of that name


def test_unreachable_message_is_one_line():
    assert catalog.unreachable_message("wikitext-2", ["u1", "u2"]) == f"could not reach wikitext-2: tried u1, u2; {OFFLINE}"


# ------------------------------------------------------------------ resolving names in download_corpus


@pytest.fixture(scope="module")
def splits() -> dict[str, bytes]:
    data = corpus_text()
    test_lines = (data / "test.txt").read_bytes().splitlines(keepends=True)
    return {"train": (data / "valid.txt").read_bytes(), "valid": b"".join(test_lines[:200]), "test": b"".join(test_lines[200:400])}


@pytest.fixture(scope="module")
def archive(splits) -> bytes:
    return make_zip(wikitext_layout(splits))


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def entry_for(archive: bytes, locations: list[str]) -> dict[str, CatalogEntry]:
    """A one-entry catalog shaped like the real WikiText ones, pointed at `locations`."""
    e = CatalogEntry(
        name="tiny-wiki",
        archive="wikitext-2-v1.zip",
        size=len(archive),
        sha256=sha(archive),
        locations=tuple(locations),
        members={s: f"wikitext-2/wiki.{s}.tokens" for s in ("train", "valid", "test")},
    )
    return {e.name: e}


def test_locations_are_tried_in_order(server, splits, archive, tmp_path, caplog):
    server.files["/wikitext-2-v1.zip"] = archive
    dead, alive = dead_url("/wikitext-2-v1.zip"), server.url("/wikitext-2-v1.zip")
    with caplog.at_level("WARNING", logger="lmforge.data.download"):
        manifest = download_corpus("tiny-wiki", tmp_path / "out", catalog=entry_for(archive, [dead, alive]), **FAST)
    assert manifest["source"] == "tiny-wiki" and manifest["sha256"] == sha(archive)
    assert_output(tmp_path / "out", splits, manifest)
    assert server.requests == ["/wikitext-2-v1.zip"]
    assert dead in caplog.text and f"trying {alive}" in caplog.text


def test_first_live_location_wins(server, archive, tmp_path):
    server.files["/a.zip"] = archive
    server.files["/b.zip"] = archive
    download_corpus("tiny-wiki", tmp_path / "out", catalog=entry_for(archive, [server.url("/a.zip"), server.url("/b.zip")]), **FAST)
    assert server.requests == ["/a.zip"]


def test_all_locations_unreachable_is_one_line(tmp_path):
    urls = [dead_url("/a.zip"), dead_url("/b.zip")]
    t0 = time.monotonic()
    with pytest.raises(Unreachable) as err:
        download_corpus("tiny-wiki", tmp_path / "out", catalog=entry_for(b"x", urls), **FAST)
    assert str(err.value) == f"could not reach tiny-wiki: tried {urls[0]}, {urls[1]}; {OFFLINE}"
    assert time.monotonic() - t0 < 5
    assert_nothing_left(tmp_path, set())


def test_builtin_name_with_local_locations(server, archive, tmp_path):
    # `locations` replaces the official ones (a mirror inside the cluster); the
    # catalog's pins still apply, so these test bytes are refused as not WikiText-2.
    server.files["/w.zip"] = archive
    urls = [dead_url(), server.url("/w.zip")]
    with pytest.raises(IntegrityError) as err:
        download_corpus("wikitext-2", tmp_path / "out", locations=urls, **FAST)
    msg = str(err.value)
    assert msg.startswith(f"wikitext-2 ({urls[1]}): downloaded bytes do not match the pin: size expected 4475746 bytes")
    assert_nothing_left(tmp_path, set())
    with pytest.raises(Unreachable, match=f"could not reach wikitext-2: tried {re.escape(urls[0])}; offline"):
        download_corpus("wikitext-2", tmp_path / "out", locations=urls[:1], **FAST)


def test_catalog_corpus_cache_hit_makes_no_request(server, archive, tmp_path):
    server.files["/w.zip"] = archive
    cat = entry_for(archive, [server.url("/w.zip")])
    first = download_corpus("tiny-wiki", tmp_path / "a", catalog=cat, cache_dir=tmp_path / "cache", **FAST)
    second = download_corpus("tiny-wiki", tmp_path / "b", catalog=cat, cache_dir=tmp_path / "cache", **FAST)
    assert second == first and len(server.requests) == 1
    assert (tmp_path / "cache" / "sha256" / sha(archive)).read_bytes() == archive


def test_catalog_pins_cannot_be_contradicted(archive, tmp_path):
    cat = entry_for(archive, ["http://127.0.0.1:9/x.zip"])
    with pytest.raises(LmforgeError, match="pinned by the catalog"):
        download_corpus("tiny-wiki", tmp_path / "out", catalog=cat, sha256="0" * 64)
    with pytest.raises(LmforgeError, match="pinned by the catalog"):
        download_corpus("tiny-wiki", tmp_path / "out", catalog=cat, size=1)


def test_local_folder_named_like_an_entry_stays_reachable(splits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for s, data in splits.items():
        (tmp_path / "wikitext-2").mkdir(exist_ok=True)
        (tmp_path / "wikitext-2" / f"{s}.txt").write_bytes(data)
    manifest = download_corpus("./wikitext-2", tmp_path / "out")
    assert_output(tmp_path / "out", splits, manifest)


def test_mistyped_name_gets_a_suggestion(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmforgeError, match="corpus not found: wikitext2; .* or the catalog corpus 'wikitext-2'"):
        download_corpus("wikitext2", tmp_path / "out")
