"""Tests for lmforge.data.download: the download stage end to end, over real archives, a real HTTP
server on 127.0.0.1 and the local disk.

Transport failures (tests/io/test_transfer.py), hostile archives (tests/data/test_archives.py),
the cache (tests/io/test_cache.py) and the text counts (tests/data/test_text_stats.py) have their
own files; this one checks what the stage publishes, what it refuses and what it leaves behind.
"""

from __future__ import annotations

import gzip

import pytest

from download_fixtures import (  # noqa: F401 (server, splits, wikitext_zip: fixtures)
    FAST, assert_nothing_left, assert_output, make_tgz, make_zip, server, sha, splits, wikitext_layout, wikitext_zip,
)

from lmforge.data.download import download_corpus
from lmforge.errors import IntegrityError, LmforgeError

from conftest import needs_wikitext


# ------------------------------------------------------------------ happy paths


@needs_wikitext  # ends on WikiText-2's published counts
def test_http_zip_pinned_official_layout(server, splits, wikitext_zip, tmp_path):
    server.files["/wikitext-2-v1.zip"] = wikitext_zip
    dest = tmp_path / "corpus"
    source = server.url("/wikitext-2-v1.zip")

    manifest = download_corpus(source, dest, sha256=sha(wikitext_zip), size=len(wikitext_zip), **FAST)

    assert manifest["source"] == source
    assert manifest["sha256"] == sha(wikitext_zip)
    assert manifest["bytes"] == len(wikitext_zip)
    assert_output(dest, splits, manifest)
    # The published facts for WikiText-2's validation split (shared/data/README.md).
    assert manifest["splits"]["train"] == {
        "sha256": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "bytes": 1_121_681,
        "lines": 3_760,
        "tokens": 217_646,
    }
    assert server.requests == ["/wikitext-2-v1.zip"]
    assert_nothing_left(tmp_path, {"corpus"})

def test_http_unpinned_logs_digest(server, splits, wikitext_zip, tmp_path, caplog):
    server.files["/w.zip"] = wikitext_zip
    with caplog.at_level("INFO", logger="lmforge.data.download"):
        manifest = download_corpus(server.url("/w.zip"), tmp_path / "out", **FAST)
    assert manifest["sha256"] == sha(wikitext_zip)
    # A WARNING carrying the digest, so the user can pin it.
    assert [r for r in caplog.records if r.levelname == "WARNING" and sha(wikitext_zip) in r.getMessage()]

@pytest.mark.parametrize("layout", ["plain", "wikitext"])
def test_local_directory(splits, tmp_path, layout):
    src = tmp_path / "src"
    if layout == "plain":
        files = {f"{s}.txt": data for s, data in splits.items()}
    else:  # WikiText names, one folder down
        files = wikitext_layout(splits)
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)

    manifest = download_corpus(src, tmp_path / "out")

    assert_output(tmp_path / "out", splits, manifest)
    digests = "".join(sha(splits[s]) for s in ("train", "valid", "test"))
    assert manifest["sha256"] == sha(digests.encode())
    assert manifest["bytes"] == sum(len(d) for d in splits.values())

def test_file_uri_zip(splits, wikitext_zip, tmp_path):
    archive = tmp_path / "wikitext-2-v1.zip"
    archive.write_bytes(wikitext_zip)
    manifest = download_corpus(archive.as_uri(), tmp_path / "out", sha256=sha(wikitext_zip), size=len(wikitext_zip))
    assert_output(tmp_path / "out", splits, manifest)
    assert archive.read_bytes() == wikitext_zip  # a local source is read, never moved

@pytest.mark.parametrize("name", ["wikitext-2.tar.gz", "wikitext-2.tgz"])
def test_tar_gz(server, splits, tmp_path, name):
    data = make_tgz(wikitext_layout(splits))
    server.files["/" + name] = data
    manifest = download_corpus(server.url("/" + name), tmp_path / "out", sha256=sha(data), **FAST)
    assert_output(tmp_path / "out", splits, manifest)

def test_local_tar_gz_with_members(splits, tmp_path):
    archive = tmp_path / "corpus.tar.gz"
    archive.write_bytes(make_tgz({"a/b/first.txt": splits["train"], "x.txt": splits["valid"], "./y.txt": splits["test"]}))
    members = {"train": "a/b/first.txt", "valid": "x.txt", "test": "y.txt"}
    manifest = download_corpus(str(archive), tmp_path / "out", members=members)
    assert_output(tmp_path / "out", splits, manifest)

def test_plain_text_file_needs_members(server, splits, tmp_path):
    text = splits["valid"]
    server.files["/all.txt"] = text
    with pytest.raises(LmforgeError, match="a plain file cannot hold three splits"):
        download_corpus(server.url("/all.txt"), tmp_path / "out", **FAST)
    assert_nothing_left(tmp_path, set())

    members = {s: "all.txt" for s in ("train", "valid", "test")}
    manifest = download_corpus(server.url("/all.txt"), tmp_path / "out", members=members, sha256=sha(text), **FAST)
    assert manifest["sha256"] == sha(text)
    assert_output(tmp_path / "out", {s: text for s in members}, manifest)

def test_rerun_replaces_previous_output_but_not_foreign_files(splits, wikitext_zip, tmp_path):
    archive = tmp_path / "w.zip"
    archive.write_bytes(wikitext_zip)
    dest = tmp_path / "out"
    download_corpus(archive, dest)
    manifest = download_corpus(archive, dest)  # e.g. a retried pipeline step
    assert_output(dest, splits, manifest)

    (dest / "notes.md").write_text("mine")
    with pytest.raises(LmforgeError, match="already holds other files"):
        download_corpus(archive, dest)
    assert (dest / "notes.md").read_text() == "mine"
    assert_nothing_left(tmp_path, {"w.zip", "out"})


# ------------------------------------------------------------------ integrity


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_pin_mismatch(server, wikitext_zip, tmp_path, wrong):
    server.files["/w.zip"] = wikitext_zip
    pins = {"sha256": sha(wikitext_zip), "size": len(wikitext_zip)}
    pins[wrong] = "0" * 64 if wrong == "sha256" else len(wikitext_zip) + 1
    with pytest.raises(IntegrityError) as err:
        download_corpus(server.url("/w.zip"), tmp_path / "out", **pins, **FAST)
    msg = str(err.value)
    assert "\n" not in msg and server.url("/w.zip") in msg
    if wrong == "sha256":
        assert "0" * 64 in msg and sha(wikitext_zip) in msg
    else:
        assert str(len(wikitext_zip) + 1) in msg and str(len(wikitext_zip)) in msg
    assert_nothing_left(tmp_path, set())

def test_local_file_pin_mismatch(wikitext_zip, tmp_path):
    archive = tmp_path / "w.zip"
    archive.write_bytes(wikitext_zip)
    with pytest.raises(IntegrityError, match=f"size expected 5 bytes, got {len(wikitext_zip)}"):
        download_corpus(archive, tmp_path / "out", size=5)
    assert_nothing_left(tmp_path, {"w.zip"})

def test_html_page_with_status_200_is_caught_by_the_pin(server, wikitext_zip, tmp_path):
    page = b"<html><body>Service temporarily unavailable</body></html>"
    server.files["/w.zip"] = page
    with pytest.raises(IntegrityError) as err:
        download_corpus(server.url("/w.zip"), tmp_path / "out", sha256=sha(wikitext_zip), cache_dir=tmp_path / "c", **FAST)
    assert sha(page) in str(err.value) and sha(wikitext_zip) in str(err.value)
    assert_nothing_left(tmp_path, set())  # not even a cache folder

def test_flipped_byte_is_a_sha256_mismatch(server, wikitext_zip, tmp_path):
    bad = bytearray(wikitext_zip)
    bad[len(bad) // 2] ^= 0x01
    server.files["/w.zip"] = bytes(bad)
    with pytest.raises(IntegrityError) as err:
        download_corpus(server.url("/w.zip"), tmp_path / "out", sha256=sha(wikitext_zip), size=len(wikitext_zip), **FAST)
    msg = str(err.value)
    assert server.url("/w.zip") in msg and sha(wikitext_zip) in msg and sha(bytes(bad)) in msg
    assert_nothing_left(tmp_path, set())

def test_gz_single_file(server, splits, tmp_path):
    text = splits["valid"]
    data = gzip.compress(text)
    server.files["/corpus.txt.gz"] = data
    members = {s: "corpus.txt" for s in ("train", "valid", "test")}
    manifest = download_corpus(server.url("/corpus.txt.gz"), tmp_path / "out", members=members, sha256=sha(data), **FAST)
    assert manifest["sha256"] == sha(data) and manifest["bytes"] == len(data)
    assert_output(tmp_path / "out", {s: text for s in members}, manifest)
    with pytest.raises(LmforgeError, match="a plain file cannot hold three splits"):
        download_corpus(server.url("/corpus.txt.gz"), tmp_path / "out2", **FAST)

def test_gz_non_utf8_names_member_and_offset(tmp_path):
    archive = tmp_path / "c.txt.gz"
    archive.write_bytes(gzip.compress(b"fine\n" * 1000 + b"caf\xe9\n"))
    with pytest.raises(LmforgeError) as err:
        download_corpus(archive, tmp_path / "out", members={s: "c.txt" for s in ("train", "valid", "test")})
    assert "c.txt in" in str(err.value) and "byte offset 5003" in str(err.value)
    assert_nothing_left(tmp_path, {"c.txt.gz"})

def test_zip_non_utf8_names_member_and_offset(splits, tmp_path):
    archive = tmp_path / "w.zip"
    archive.write_bytes(make_zip({**wikitext_layout(splits), "wikitext-2/wiki.test.tokens": b"ok\n\xff\xfe"}))
    with pytest.raises(LmforgeError) as err:
        download_corpus(archive, tmp_path / "out")
    assert "wikitext-2/wiki.test.tokens" in str(err.value) and "byte offset 3" in str(err.value)
    assert_nothing_left(tmp_path, {"w.zip"})


# ------------------------------------------------------------------ user mistakes


def test_missing_local_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(LmforgeError) as err:
        download_corpus(missing, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and str(missing) in msg and "--corpus" in msg and "corpus.source" in msg
    assert_nothing_left(tmp_path, set())

def test_directory_rejects_pins(splits, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for s, data in splits.items():
        (src / f"{s}.txt").write_bytes(data)
    with pytest.raises(LmforgeError, match="directory"):
        download_corpus(src, tmp_path / "out", sha256="a" * 64)

def test_missing_split_names_what_was_looked_for(splits, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.txt").write_bytes(splits["train"])
    (src / "valid.txt").write_bytes(splits["valid"])
    with pytest.raises(LmforgeError, match=r"no test split .*wiki\.test\.tokens.*corpus\.members\.test"):
        download_corpus(src, tmp_path / "out")
    assert_nothing_left(tmp_path, {"src"})

def test_non_utf8_split_names_file_and_offset(splits, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.txt").write_bytes(splits["train"])
    (src / "valid.txt").write_bytes(b"good line\ncaf\xe9 latin-1\n")
    (src / "test.txt").write_bytes(splits["test"])
    with pytest.raises(LmforgeError) as err:
        download_corpus(src, tmp_path / "out")
    assert "valid.txt" in str(err.value) and "byte offset 13" in str(err.value)
    assert_nothing_left(tmp_path, {"src"})

def test_secret_query_values_never_reach_messages_or_the_manifest(server, splits, wikitext_zip, tmp_path, caplog):
    path = "/w.zip?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA&part=1"
    server.files[path] = wikitext_zip
    url = server.url(path)
    with caplog.at_level("INFO", logger="lmforge"):  # the stage's and the transfer's (lmforge.io.transfer) lines
        manifest = download_corpus(url, tmp_path / "out", **FAST)
    assert manifest["source"] == server.url("/w.zip?X-Amz-Signature=***&X-Amz-Credential=***&part=1")
    assert "s3cr3t" not in caplog.text and "AKIA" not in caplog.text
    server.script[path] = [("status", 403, {})]
    with pytest.raises(LmforgeError) as err:
        download_corpus(url, tmp_path / "out2", **FAST)
    assert "HTTP 403" in str(err.value) and "s3cr3t" not in str(err.value)
