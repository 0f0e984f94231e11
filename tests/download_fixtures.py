"""Shared by the download tests (tests/data/test_download.py, test_archives.py, test_catalog.py,
tests/io/test_transfer.py, test_cache.py): real WikiText-2 splits, archives made of them, and a real
HTTP server on 127.0.0.1 whose failures are scripted.

The corpus is real WikiText-2 text from ../shared/data (see its README), packed
in the official wikitext-2-v1.zip layout, kept small so each file runs in seconds.
Import the fixtures (`server`, `splits`, `wikitext_zip`) into a test module to use them.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import sys
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import corpus_text

FAST = {"retries": 3, "backoff_s": 0.01, "timeout_s": 5.0}

@pytest.fixture(scope="module")
def splits() -> dict[str, bytes]:
    """Small splits: all of valid.txt as train (WikiText-2's counts are published), slices of test.txt;
    WikiText-2 from ../shared/data, or its generated stand-in where that is absent (conftest.corpus_text)."""
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
