"""Tests for lmforge.data.download: real archives, a real HTTP server on 127.0.0.1, S3 via moto's server.

The corpus is WikiText-2 text from ../shared/data (see its README), or its generated
stand-in where that folder is absent (conftest.corpus_text), packed in the official
wikitext-2-v1.zip layout, kept small so the file runs in seconds.
Transport failures are real too: the HTTP server drops, stalls, lies about
lengths and answers 429/503 on cue; S3 transfers are broken by a TCP proxy
between boto3 and moto. Hostile archives are built byte by byte where zipfile
would refuse to write them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import socket
import stat
import sys
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lmforge.data.download import (
    MAX_BYTES,
    MAX_MEMBERS,
    TextStats,
    Unreachable,
    backoff_delay,
    download_corpus,
    fetch,
    find_split_members,
    normalize_member,
    parse_content_range,
    parse_retry_after,
    text_stats,
)
from lmforge.errors import IntegrityError, LmforgeError

from conftest import corpus_text, needs_wikitext
FAST = {"retries": 3, "backoff_s": 0.01, "timeout_s": 5.0}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def splits() -> dict[str, bytes]:
    """Small splits: all of valid.txt as train (WikiText-2's counts are published), slices of test.txt."""
    data = corpus_text()
    test_lines = (data / "test.txt").read_bytes().splitlines(keepends=True)
    return {
        "train": (data / "valid.txt").read_bytes(),
        "valid": b"".join(test_lines[:300]),
        "test": b"".join(test_lines[300:600]),
    }


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tgz(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def wikitext_layout(splits: dict[str, bytes], top: str = "wikitext-2") -> dict[str, bytes]:
    """The member names inside the official wikitext-2-v1.zip."""
    return {f"{top}/wiki.{s}.tokens": data for s, data in splits.items()}


@pytest.fixture(scope="module")
def wikitext_zip(splits) -> bytes:
    return make_zip(wikitext_layout(splits))


@dataclass
class Request:
    """What one request asked for and what the server sent back."""

    path: str
    headers: dict[str, str]
    status: int = 0
    sent: int = 0  # body bytes written

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


class Server:
    """A real HTTP server on 127.0.0.1 serving `files`, honouring Range/If-Range, with scripted behaviours.

    `script[path]` is a list of actions consumed one per request to that path:
      ("status", code, headers)   answer with that status and a short body
      ("drop", n)                 send the normal headers, then only n body bytes, then close
      ("replace", n, data)        like drop, then replace the file (so its ETag changes)
      ("stall", n, seconds)       send n body bytes, then wait, then close
    `truncate`: paths of which the server only ever has the first half (it still
    announces the full length). `length_delta`: added to every Content-Length.
    `ranges`: False makes the server ignore Range headers (200 and the whole file).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.log: list[Request] = []
        self.script: dict[str, list[tuple]] = {}
        self.truncate: set[str] = set()
        self.length_delta: dict[str, int] = {}
        self.ranges = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                req = Request(self.path, {k.lower(): v for k, v in self.headers.items()})
                server.log.append(req)
                queue = server.script.get(self.path) or []
                action = queue.pop(0) if queue else ("serve",)
                if action[0] == "status":
                    _, code, headers = action
                    body = b"<html>busy</html>"
                    self.send_response(code)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    req.status, req.sent = code, len(body)
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    req.status = 404
                    return
                etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and server.ranges and self.headers.get("If-Range", etag) == etag:
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        req.status = 416
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) + server.length_delta.get(self.path, 0)))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                limit = len(body)
                if action[0] in ("drop", "replace", "stall"):
                    limit = action[1]
                if self.path in server.truncate:
                    limit = max(0, len(data) // 2 - start)
                self.wfile.write(body[:limit])
                self.wfile.flush()
                req.status, req.sent = status, min(limit, len(body))
                if action[0] == "replace":
                    server.files[self.path] = action[2]
                if action[0] == "stall":
                    time.sleep(action[2])
                if limit < len(body) or server.length_delta.get(self.path):
                    self.close_connection = True  # the client sees a short body, then EOF

            def log_message(self, *args) -> None:
                pass

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                # A client that hangs up mid-answer (a pin refusing the announced
                # size, a read timeout) is part of these tests, not a server fault.
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list[str]:
        return [r.path for r in self.log]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def dead_url(path: str = "/w.zip") -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_split(data: bytes) -> dict:
    """Counted independently of the code under test: WikiText lines all end with '\\n'."""
    lines = data.decode("utf-8").split("\n")[:-1]
    return {
        "sha256": sha(data),
        "bytes": len(data),
        "lines": len(lines),
        "tokens": sum(len(line.split()) + 1 for line in lines),
    }


def assert_output(dest: Path, splits: dict[str, bytes], manifest: dict) -> None:
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "test.txt", "train.txt", "valid.txt"]
    for split, data in splits.items():
        assert (dest / f"{split}.txt").read_bytes() == data
        assert manifest["splits"][split] == expected_split(data)
    assert json.loads((dest / "manifest.json").read_text()) == manifest


def assert_nothing_left(parent: Path, before: set[str]) -> None:
    """No output and no temporary file or folder beside it."""
    assert {p.name for p in parent.iterdir()} == before


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


# ------------------------------------------------------------------ integrity and transport failures


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


def test_truncated_body_is_an_error(server, wikitext_zip, tmp_path):
    # The server only ever has the first half, yet announces the whole length.
    server.files["/w.zip"] = wikitext_zip
    server.truncate.add("/w.zip")
    with pytest.raises(LmforgeError, match=f"of {len(wikitext_zip)} bytes") as err:
        download_corpus(server.url("/w.zip"), tmp_path / "out", **FAST)
    assert "after 4 attempts" in str(err.value)
    # The first attempt brought half the bytes (progress: resumed at no cost), then
    # `retries` resumed attempts brought nothing more.
    half = len(wikitext_zip) // 2
    assert [r.range for r in server.log] == [None] + [f"bytes={half}-"] * FAST["retries"]
    assert_nothing_left(tmp_path, set())


def test_dropped_connection_resumes_with_range(server, splits, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    cut = 100_000
    server.script["/w.zip"] = [("drop", cut)]
    manifest = download_corpus(server.url("/w.zip"), tmp_path / "out", sha256=sha(wikitext_zip), **FAST)
    assert_output(tmp_path / "out", splits, manifest)
    first, second = server.log
    assert (first.status, first.sent, first.range) == (200, cut, None)
    assert second.range == f"bytes={cut}-"
    assert second.headers["if-range"] == '"' + sha(wikitext_zip)[:16] + '"'  # the ETag of the first answer
    assert (second.status, second.sent) == (206, len(wikitext_zip) - cut)  # only the rest was sent


def test_server_ignoring_range_restarts_cleanly(server, splits, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    server.ranges = False
    server.script["/w.zip"] = [("drop", 100_000)]
    manifest = download_corpus(server.url("/w.zip"), tmp_path / "out", sha256=sha(wikitext_zip), **FAST)
    assert_output(tmp_path / "out", splits, manifest)
    assert server.log[1].range == "bytes=100000-"
    assert (server.log[1].status, server.log[1].sent) == (200, len(wikitext_zip))


def test_file_changed_between_attempts_is_fetched_whole(server, splits, wikitext_zip, tmp_path):
    # If-Range carries the first answer's ETag: a replaced file comes back whole (200),
    # never as the new file's tail glued to the old file's head.
    changed = make_zip(wikitext_layout({**splits, "test": splits["valid"]}))
    server.files["/w.zip"] = wikitext_zip
    server.script["/w.zip"] = [("replace", 100_000, changed)]
    manifest = download_corpus(server.url("/w.zip"), tmp_path / "out", **FAST)
    assert manifest["sha256"] == sha(changed)
    assert (server.log[1].range, server.log[1].status, server.log[1].sent) == ("bytes=100000-", 200, len(changed))


def test_stalled_body_times_out_and_resumes(server, splits, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    server.script["/w.zip"] = [("stall", 50_000, 2.0)]
    t0 = time.monotonic()
    manifest = download_corpus(server.url("/w.zip"), tmp_path / "out", **{**FAST, "timeout_s": 0.3})
    assert time.monotonic() - t0 < 1.8  # the read timeout fired, not the server's close
    assert_output(tmp_path / "out", splits, manifest)
    assert server.log[1].range == "bytes=50000-"


def test_content_length_too_small_is_caught_by_the_pin(server, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    server.length_delta["/w.zip"] = -1000  # the client reads 1000 bytes too few and thinks it is done
    with pytest.raises(IntegrityError) as err:
        download_corpus(server.url("/w.zip"), tmp_path / "out", sha256=sha(wikitext_zip), **FAST)
    assert sha(wikitext_zip) in str(err.value) and sha(wikitext_zip[:-1000]) in str(err.value)
    assert_nothing_left(tmp_path, set())


def test_content_length_too_large(server, splits, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    server.length_delta["/w.zip"] = 1000
    # Against a size pin the announcement alone is refused, before the body is read.
    with pytest.raises(IntegrityError, match=f"size expected {len(wikitext_zip)} bytes, the server announces"):
        download_corpus(server.url("/w.zip"), tmp_path / "out", size=len(wikitext_zip), **FAST)
    assert_nothing_left(tmp_path, set())
    # Unpinned on size: the body ends early, the resume finds nothing more (416), the sha256 pin holds.
    server.log.clear()
    manifest = download_corpus(server.url("/w.zip"), tmp_path / "out", sha256=sha(wikitext_zip), **FAST)
    assert_output(tmp_path / "out", splits, manifest)
    assert [(r.range, r.status) for r in server.log] == [(None, 200), (f"bytes={len(wikitext_zip)}-", 416)]


def test_503_twice_then_success(server, splits, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    server.script["/w.zip"] = [("status", 503, {}), ("status", 503, {})]
    manifest = download_corpus(server.url("/w.zip"), tmp_path / "out", sha256=sha(wikitext_zip), **FAST)
    assert_output(tmp_path / "out", splits, manifest)
    assert [r.status for r in server.log] == [503, 503, 200]


def test_503_forever_gives_up_after_the_attempts(server, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    server.script["/w.zip"] = [("status", 503, {})] * 50
    t0 = time.monotonic()
    with pytest.raises(LmforgeError) as err:
        download_corpus(server.url("/w.zip"), tmp_path / "out", **{**FAST, "backoff_s": 0.05})
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    assert "\n" not in msg and "after 3 attempts" in msg and "HTTP 503" in msg and server.url("/w.zip") in msg
    assert len(server.log) == FAST["retries"]
    assert elapsed < 2.0  # jittered 0.05 s + 0.1 s at most, plus the requests
    assert_nothing_left(tmp_path, set())


def test_429_honours_retry_after(server, splits, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    server.script["/w.zip"] = [("status", 429, {"Retry-After": "1"})]
    t0 = time.monotonic()
    manifest = download_corpus(server.url("/w.zip"), tmp_path / "out", **FAST)  # backoff alone: 0.01 s
    assert time.monotonic() - t0 >= 0.95
    assert_output(tmp_path / "out", splits, manifest)
    assert [r.status for r in server.log] == [429, 200]


def test_retry_after_is_capped(server, splits, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    server.script["/w.zip"] = [("status", 503, {"Retry-After": "3600"})]
    t0 = time.monotonic()
    download_corpus(server.url("/w.zip"), tmp_path / "out", **FAST, max_backoff_s=0.1)
    assert time.monotonic() - t0 < 2.0


def test_connection_refused_is_retried_then_reported(tmp_path):
    url = dead_url()
    with pytest.raises(Unreachable) as err:
        download_corpus(url, tmp_path / "out", **FAST)
    assert "\n" not in str(err.value) and url in str(err.value) and "refused" in str(err.value).lower()
    assert_nothing_left(tmp_path, set())


def test_404_is_not_retried(server, tmp_path):
    with pytest.raises(LmforgeError, match="HTTP 404"):
        download_corpus(server.url("/missing.zip"), tmp_path / "out", **FAST)
    assert server.requests == ["/missing.zip"]
    assert_nothing_left(tmp_path, set())


def test_html_page_named_zip(server, tmp_path):
    server.files["/w.zip"] = b"<html>login required</html>"
    with pytest.raises(LmforgeError, match=r"named like a \.zip archive"):
        download_corpus(server.url("/w.zip"), tmp_path / "out", **FAST)
    assert_nothing_left(tmp_path, set())


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


def zip_with_raw_name(entries: dict[str, bytes], placeholder: str, raw: bytes) -> bytes:
    """A zip whose member called `placeholder` is renamed to the `raw` bytes (same length) in every header.

    zipfile cannot write such names (it cuts them at NUL, for one): hostile
    archives are made by other tools.
    """
    assert len(placeholder.encode()) == len(raw)
    return make_zip(entries).replace(placeholder.encode(), raw)


def make_tgz_of(infos: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        for info, data in infos:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tar_entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("bad", ["../evil", "/abs/evil", "wikitext-2/../../evil"])
def test_zip_with_unsafe_member_is_rejected(splits, tmp_path, bad):
    archive = tmp_path / "w.zip"
    archive.write_bytes(make_zip({**wikitext_layout(splits), bad: b"pwned\n"}))
    with pytest.raises(LmforgeError, match="unsafe member name"):
        download_corpus(archive, tmp_path / "sub" / "out")
    assert_nothing_left(tmp_path, {"w.zip", "sub"})
    assert list((tmp_path / "sub").iterdir()) == []
    assert not Path("/abs/evil").exists()


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"wikitext-2/x\x00/../../../evil", "NUL byte"),  # zipfile's .filename would show only 'wikitext-2/x'
        (b"..\\..\\..\\..\\..\\..\\..\\evil", "'..' component"),  # Windows separators
        (b"C:/Windows/evil.txt_______", "absolute path"),
    ],
)
def test_zip_raw_names_are_checked_before_zipfile_sanitizes_them(splits, tmp_path, raw, why):
    placeholder = "P" * len(raw)
    archive = tmp_path / "w.zip"
    archive.write_bytes(zip_with_raw_name({**wikitext_layout(splits), placeholder: b"pwned\n"}, placeholder, raw))
    with pytest.raises(LmforgeError, match=why):
        download_corpus(archive, tmp_path / "out")
    assert_nothing_left(tmp_path, {"w.zip"})


def test_zip_with_symlink_is_rejected(splits, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in wikitext_layout(splits).items():
            zf.writestr(name, data)
        link = zipfile.ZipInfo("wikitext-2/passwd")
        link.create_system = 3  # unix: the high 16 bits of external_attr are st_mode
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    archive = tmp_path / "w.zip"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(LmforgeError, match="links are not allowed"):
        download_corpus(archive, tmp_path / "out")
    assert_nothing_left(tmp_path, {"w.zip"})


@pytest.mark.parametrize(
    "entry, why",
    [
        (tar_entry("wikitext-2/link", tarfile.SYMTYPE, "/etc/passwd"), "links are not allowed"),
        (tar_entry("wikitext-2/hard", tarfile.LNKTYPE, "wikitext-2/wiki.train.tokens"), "links are not allowed"),
        (tar_entry("wikitext-2/tty", tarfile.CHRTYPE), "devices and FIFOs"),
        (tar_entry("wikitext-2/fifo", tarfile.FIFOTYPE), "devices and FIFOs"),
        (tar_entry("../../evil"), "'..' component"),
        (tar_entry("/etc/evil"), "absolute path"),
    ],
    ids=["symlink", "hardlink", "device", "fifo", "slip", "absolute"],
)
def test_hostile_tar_is_rejected(server, splits, tmp_path, entry, why):
    data = make_tgz_of([*((tar_entry(n), d) for n, d in wikitext_layout(splits).items()), (entry, b"" if entry.isreg() else None)])
    server.files["/w.tar.gz"] = data
    with pytest.raises(LmforgeError, match=why):
        download_corpus(server.url("/w.tar.gz"), tmp_path / "out", cache_dir=tmp_path / "cache", **FAST)
    assert_nothing_left(tmp_path, set())  # nothing published, nothing cached


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("twin", ["wikitext-2/wiki.train.tokens", "./wikitext-2/wiki.train.tokens", "wikitext-2//wiki.train.tokens"])
def test_duplicate_member_names_are_rejected(splits, tmp_path, kind, twin):
    entries = [*wikitext_layout(splits).items(), (twin, b"the other train\n")]
    archive = tmp_path / ("w.zip" if kind == "zip" else "w.tar.gz")
    if kind == "zip":
        buf = io.BytesIO()
        with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is asked to write
            for name, data in entries:
                zf.writestr(name, data)
        archive.write_bytes(buf.getvalue())
    else:
        archive.write_bytes(make_tgz_of([(tar_entry(n), d) for n, d in entries]))
    with pytest.raises(LmforgeError, match="duplicate member"):
        download_corpus(archive, tmp_path / "out")
    assert_nothing_left(tmp_path, {archive.name})


def test_file_that_is_also_a_folder_is_rejected(splits, tmp_path):
    archive = tmp_path / "w.zip"
    archive.write_bytes(make_zip({**wikitext_layout(splits), "wikitext-2/x": b"a", "wikitext-2/x/y": b"b"}))
    with pytest.raises(LmforgeError, match="both a file and a folder"):
        download_corpus(archive, tmp_path / "out")
    assert_nothing_left(tmp_path, {"w.zip"})


MIB = 1 << 20


def test_zip_bomb_declared_size_is_rejected_before_writing(server, splits, wikitext_zip, tmp_path):
    bomb = make_zip({**wikitext_layout(splits), "wikitext-2/zeros": bytes(8 * MIB)})
    assert len(bomb) < len(wikitext_zip) + 64 * 1024  # 8 MiB of zeros deflate to a few KiB
    server.files["/w.zip"] = bomb
    with pytest.raises(LmforgeError, match="declares more than 4194304 bytes uncompressed"):
        download_corpus(server.url("/w.zip"), tmp_path / "out", max_bytes=4 * MIB, cache_dir=tmp_path / "c", **FAST)
    assert_nothing_left(tmp_path, set())


def test_zip_whose_header_lies_about_its_size_is_rejected(splits, tmp_path):
    # Declared: 1000 bytes for the train member; stored: its real 1.1 MB. zipfile
    # stops at the declared size, and the CRC of that prefix does not match.
    data = make_zip(wikitext_layout(splits))
    real = len(splits["train"]).to_bytes(4, "little")
    assert data.count(real) == 2  # local header and central directory
    archive = tmp_path / "w.zip"
    archive.write_bytes(data.replace(real, (1000).to_bytes(4, "little")))
    with pytest.raises(LmforgeError, match="wiki.train.tokens in .*(CRC|cannot read)"):
        download_corpus(archive, tmp_path / "out")
    assert_nothing_left(tmp_path, {"w.zip"})


def test_gz_bomb_is_stopped_while_streaming(tmp_path):
    archive = tmp_path / "c.txt.gz"
    archive.write_bytes(gzip.compress(b"a b c\n" * (2 * MIB), compresslevel=1))  # 12 MiB of text
    with pytest.raises(LmforgeError, match="unpacks to more than 4194304 bytes"):
        download_corpus(archive, tmp_path / "out", members={s: "c.txt" for s in ("train", "valid", "test")}, max_bytes=4 * MIB)
    assert_nothing_left(tmp_path, {"c.txt.gz"})


def test_tar_bomb_declared_size_and_member_count(splits, tmp_path):
    archive = tmp_path / "w.tar.gz"
    archive.write_bytes(make_tgz({**wikitext_layout(splits), "wikitext-2/zeros": bytes(8 * MIB)}))
    with pytest.raises(LmforgeError, match="declares more than"):
        download_corpus(archive, tmp_path / "out", max_bytes=4 * MIB)
    many = tmp_path / "many.tar.gz"
    many.write_bytes(make_tgz({**wikitext_layout(splits), **{f"junk/{i}": b"" for i in range(20)}}))
    with pytest.raises(LmforgeError, match="more than 10 members"):
        download_corpus(many, tmp_path / "out", max_members=10)
    assert_nothing_left(tmp_path, {"w.tar.gz", "many.tar.gz"})


def test_tar_with_root_entry_is_fine(splits, tmp_path):
    # `tar -C dir -czf corpus.tgz .` stores "./" first: the archive's root, not an unsafe name.
    archive = tmp_path / "c.tgz"
    archive.write_bytes(make_tgz_of([(tar_entry("./", tarfile.DIRTYPE), None), *((tar_entry(f"./{s}.txt"), d) for s, d in splits.items())]))
    manifest = download_corpus(archive, tmp_path / "out")
    assert_output(tmp_path / "out", splits, manifest)


def test_default_limits_fit_wikitext_103():
    # WikiText-103 (raw): ~550 MB uncompressed in 4 entries (a folder and 3 files).
    assert MAX_BYTES >= 1 << 30 and MAX_MEMBERS >= 1000


# ------------------------------------------------------------------ cache


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


def test_fetch_writes_atomically(server, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    out = tmp_path / "w.zip"
    assert fetch(server.url("/w.zip"), out, sha256=sha(wikitext_zip), **FAST) == (sha(wikitext_zip), len(wikitext_zip))
    assert out.read_bytes() == wikitext_zip
    with pytest.raises(IntegrityError):
        fetch(server.url("/w.zip"), tmp_path / "x.zip", sha256="0" * 64, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.zip"]


# ------------------------------------------------------------------ S3 (moto's real HTTP server)


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of a real server, to break S3 transfers for real.

    `plan[i]` decides connection i (counted from 0): ("cut", n) forwards n
    response bytes then closes both sides; ("reply", raw) answers with the raw
    bytes without asking upstream. Every connection's request bytes are kept in
    `sent`.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.plan: dict[int, tuple] = {}
        self.sent: list[bytearray] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.sent.append(bytearray())
            threading.Thread(target=self._serve, args=(len(self.sent) - 1, client), daemon=True).start()

    def _serve(self, i: int, client: socket.socket) -> None:
        plan = self.plan.get(i, ("pass",))
        if plan[0] == "reply":
            while b"\r\n\r\n" not in self.sent[i]:
                chunk = client.recv(65536)
                if not chunk:
                    break
                self.sent[i] += chunk
            client.sendall(plan[1])
            client.close()
            return
        up = socket.create_connection(self.upstream)

        def upstream_to_client() -> None:
            budget = plan[1] if plan[0] == "cut" else None
            try:
                while chunk := up.recv(65536):
                    if budget is not None:
                        chunk = chunk[:budget]
                        budget -= len(chunk)
                    client.sendall(chunk)
                    if budget == 0:
                        break
            except OSError:
                pass
            for s in (client, up):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

        threading.Thread(target=upstream_to_client, daemon=True).start()
        try:
            while chunk := client.recv(65536):
                self.sent[i] += chunk
                up.sendall(chunk)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def moto_endpoint():
    pytest.importorskip("moto")
    pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    yield host, port
    moto.stop()


@pytest.fixture
def s3_bucket(moto_endpoint, wikitext_zip, monkeypatch):
    import boto3

    host, port = moto_endpoint
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    s3.create_bucket(Bucket="corpora")
    s3.put_object(Bucket="corpora", Key="wikitext/wikitext-2-v1.zip", Body=wikitext_zip)
    return f"http://{host}:{port}"


def test_s3_source(s3_bucket, splits, wikitext_zip, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket)
    manifest = download_corpus(
        "s3://corpora/wikitext/wikitext-2-v1.zip", tmp_path / "out", sha256=sha(wikitext_zip), **FAST
    )
    assert_output(tmp_path / "out", splits, manifest)
    with pytest.raises(LmforgeError, match="NoSuchKey"):
        download_corpus("s3://corpora/missing.zip", tmp_path / "out2", **FAST)


def test_s3_dropped_body_resumes_with_a_ranged_if_match_get(s3_bucket, moto_endpoint, splits, wikitext_zip, tmp_path):
    proxy = CuttingProxy(moto_endpoint)
    proxy.plan[0] = ("cut", 60_000)  # headers (< 1 KiB) and the first ~59 KB of the body
    try:
        manifest = download_corpus(
            "s3://corpora/wikitext/wikitext-2-v1.zip", tmp_path / "out", sha256=sha(wikitext_zip),
            endpoint_url=proxy.url, **FAST,
        )
    finally:
        proxy.close()
    assert_output(tmp_path / "out", splits, manifest)
    assert len(proxy.sent) == 2
    first, second = (bytes(s).lower() for s in proxy.sent)
    assert b"range:" not in first
    offset = int(second.split(b"range: bytes=")[1].split(b"-")[0])
    assert 50_000 < offset < 60_000 and b"if-match:" in second


def test_s3_503_is_retried_by_botocore(s3_bucket, moto_endpoint, splits, wikitext_zip, tmp_path):
    body = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
    proxy = CuttingProxy(moto_endpoint)
    proxy.plan[0] = (
        "reply",
        b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body,
    )
    try:
        manifest = download_corpus(
            "s3://corpora/wikitext/wikitext-2-v1.zip", tmp_path / "out", sha256=sha(wikitext_zip),
            endpoint_url=proxy.url, **FAST,
        )
    finally:
        proxy.close()
    assert_output(tmp_path / "out", splits, manifest)
    assert len(proxy.sent) == 2


# ------------------------------------------------------------------ pure helpers


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
    data = "héllo wörld\r\n€ x\r".encode() * 3 + b"tail"
    stats = TextStats()
    for i in range(0, len(data), step):
        stats.update(data[i : i + step])
    assert stats.finish() == text_stats(data)

    bad = "€€".encode() + b"\xff" + b"more"
    stats = TextStats()
    with pytest.raises(Exception) as err:
        for i in range(0, len(bad), step):
            stats.update(bad[i : i + step])
        stats.finish()
    assert err.value.offset == 6

    truncated = "ab€".encode()[:-1]  # an incomplete last character
    stats = TextStats()
    with pytest.raises(Exception) as err:
        for i in range(0, len(truncated), step):
            stats.update(truncated[i : i + step])
        stats.finish()
    assert err.value.offset == 2


def test_backoff_delay_grows_with_jitter_and_caps():
    assert [backoff_delay(n, 2.0, 60.0, rand=lambda: 0.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert [backoff_delay(n, 2.0, 60.0, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert backoff_delay(10, 2.0, 60.0, rand=lambda: 1.0) == 60.0
    delays = {backoff_delay(3, 2.0, 60.0) for _ in range(50)}
    assert len(delays) > 40 and all(4.0 <= d <= 8.0 for d in delays)  # jittered, never immediate
    assert backoff_delay(1, 2.0, 60.0, retry_after=7) == 7
    assert backoff_delay(1, 2.0, 60.0, retry_after=3600) == 60.0


def test_parse_retry_after_and_content_range():
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=timezone.utc)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now=now) == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_content_range("bytes 100-199/1000") == (100, 1000)
    assert parse_content_range("bytes 100-199/*") == (100, None)
    assert parse_content_range("bytes */1000") == (None, 1000)
    assert parse_content_range(None) == (None, None) and parse_content_range("pages 1-2/3") == (None, None)


def test_secret_query_values_never_reach_messages_or_the_manifest(server, splits, wikitext_zip, tmp_path, caplog):
    path = "/w.zip?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA&part=1"
    server.files[path] = wikitext_zip
    url = server.url(path)
    with caplog.at_level("INFO", logger="lmforge.data.download"):
        manifest = download_corpus(url, tmp_path / "out", **FAST)
    assert manifest["source"] == server.url("/w.zip?X-Amz-Signature=***&X-Amz-Credential=***&part=1")
    assert "s3cr3t" not in caplog.text and "AKIA" not in caplog.text
    server.script[path] = [("status", 403, {})]
    with pytest.raises(LmforgeError) as err:
        download_corpus(url, tmp_path / "out2", **FAST)
    assert "HTTP 403" in str(err.value) and "s3cr3t" not in str(err.value)


def test_normalize_member():
    assert normalize_member("./wikitext-2//wiki.train.tokens") == "wikitext-2/wiki.train.tokens"
    assert normalize_member("a\\b.txt") == "a/b.txt"
    for bad in ["../x", "a/../../x", "/etc/passwd", "\\x", "C:/x", "."]:
        with pytest.raises(LmforgeError):
            normalize_member(bad)


def test_find_split_members():
    names = ["README", "wikitext-2/wiki.train.tokens", "wikitext-2/wiki.valid.tokens", "wikitext-2/wiki.test.tokens"]
    assert find_split_members(names, {}, "x") == {s: f"wikitext-2/wiki.{s}.tokens" for s in ("train", "valid", "test")}
    # Top level wins over one folder down; members win over names.
    chosen = find_split_members([*names, "train.txt", "other.txt"], {"test": "other.txt"}, "x")
    assert chosen == {"train": "train.txt", "valid": "wikitext-2/wiki.valid.tokens", "test": "other.txt"}
    with pytest.raises(LmforgeError, match="several train splits"):
        find_split_members([*names, "copy/wiki.train.tokens"], {}, "x")
    with pytest.raises(LmforgeError, match="corpus.members.valid = 'nope.txt' not found"):
        find_split_members(names, {"valid": "nope.txt"}, "x")
