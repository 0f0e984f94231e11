"""Tests for lmforge.io.transfer: resumed, retried downloads over a real HTTP server on 127.0.0.1
and S3 via moto's server.

The HTTP server drops, stalls, lies about lengths and answers 429/503 on cue; S3
transfers are broken by a TCP proxy between boto3 and moto. Most tests drive the
transfer through the download stage (download_corpus), whose output shows that
the resumed bytes are the right ones.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import datetime, timezone

import pytest

from download_fixtures import (  # noqa: F401 (server, splits, wikitext_zip: fixtures)
    FAST, assert_nothing_left, assert_output, dead_url, make_zip, server, sha, splits, wikitext_layout, wikitext_zip,
)

from lmforge.data.download import download_corpus
from lmforge.errors import IntegrityError, LmforgeError
from lmforge.io.transfer import Unreachable, backoff_delay, fetch, parse_content_range, parse_retry_after


# ------------------------------------------------------------------ HTTP


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

def test_fetch_writes_atomically(server, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    out = tmp_path / "w.zip"
    assert fetch(server.url("/w.zip"), out, sha256=sha(wikitext_zip), **FAST) == (sha(wikitext_zip), len(wikitext_zip))
    assert out.read_bytes() == wikitext_zip
    with pytest.raises(IntegrityError):
        fetch(server.url("/w.zip"), tmp_path / "x.zip", sha256="0" * 64, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.zip"]



def test_fetch_takes_only_remote_locations(tmp_path):
    (tmp_path / "w.zip").write_bytes(b"local")
    with pytest.raises(LmforgeError, match="only http"):
        fetch(str(tmp_path / "w.zip"), tmp_path / "copy.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.zip"]  # no copy, no temporary

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

def download_through(proxy: CuttingProxy, wikitext_zip, out):
    """The WikiText archive from the moto bucket through `proxy` (closed afterwards); its manifest."""
    try:
        return download_corpus("s3://corpora/wikitext/wikitext-2-v1.zip", out, sha256=sha(wikitext_zip),
                               endpoint_url=proxy.url, **FAST)
    finally:
        proxy.close()


def test_s3_dropped_body_resumes_with_a_ranged_if_match_get(s3_bucket, moto_endpoint, splits, wikitext_zip, tmp_path):
    proxy = CuttingProxy(moto_endpoint)
    proxy.plan[0] = ("cut", 60_000)  # headers (< 1 KiB) and the first ~59 KB of the body
    manifest = download_through(proxy, wikitext_zip, tmp_path / "out")
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
    manifest = download_through(proxy, wikitext_zip, tmp_path / "out")
    assert_output(tmp_path / "out", splits, manifest)
    assert len(proxy.sent) == 2


# ------------------------------------------------------------------ pure helpers


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
