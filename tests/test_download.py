"""Tests for lmforge.download: real archives, a real HTTP server on 127.0.0.1, S3 via moto's server.

The corpus is real WikiText-2 text from ../shared/data (see its README), packed
in the official wikitext-2-v1.zip layout, kept small so the file runs in seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lmforge.download import TextStats, download_corpus, find_split_members, normalize_member, text_stats
from lmforge.errors import IntegrityError, LmforgeError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
FAST = {"retries": 3, "backoff_s": 0.01, "timeout_s": 5.0}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def splits() -> dict[str, bytes]:
    """Small real splits: all of valid.txt as train (its counts are published), slices of test.txt."""
    if not (DATA / "valid.txt").is_file() or not (DATA / "test.txt").is_file():
        pytest.skip(f"WikiText-2 sample data not found at {DATA} (see shared/data/README.md)")
    test_lines = (DATA / "test.txt").read_bytes().splitlines(keepends=True)
    return {
        "train": (DATA / "valid.txt").read_bytes(),
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


class Server:
    """A real HTTP server on 127.0.0.1 serving `files`, with scripted failures."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.fail_503: dict[str, int] = {}  # path -> 503 responses still to send
        self.truncate: set[str] = set()  # paths whose body stops halfway (full Content-Length)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                if server.fail_503.get(self.path, 0) > 0:
                    server.fail_503[self.path] -= 1
                    self.send_error(503, "try later")
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.path in server.truncate:
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True  # the client sees a short body, then EOF
                    return
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


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
    with caplog.at_level("INFO", logger="lmforge.download"):
        manifest = download_corpus(server.url("/w.zip"), tmp_path / "out", **FAST)
    assert manifest["sha256"] == sha(wikitext_zip)
    assert sha(wikitext_zip) in caplog.text  # so the user can pin it


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
    server.files["/w.zip"] = wikitext_zip
    server.truncate.add("/w.zip")
    with pytest.raises(LmforgeError, match=f"of {len(wikitext_zip)} bytes"):
        download_corpus(server.url("/w.zip"), tmp_path / "out", **FAST)
    assert len(server.requests) == FAST["retries"]  # a short body is retried, then reported
    assert_nothing_left(tmp_path, set())


def test_503_twice_then_success(server, splits, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    server.fail_503["/w.zip"] = 2
    manifest = download_corpus(server.url("/w.zip"), tmp_path / "out", sha256=sha(wikitext_zip), **FAST)
    assert_output(tmp_path / "out", splits, manifest)
    assert server.requests == ["/w.zip"] * 3


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


@pytest.mark.parametrize("bad", ["../evil", "/abs/evil", "wikitext-2/../../evil"])
def test_zip_with_unsafe_member_is_rejected(splits, tmp_path, bad):
    archive = tmp_path / "w.zip"
    archive.write_bytes(make_zip({**wikitext_layout(splits), bad: b"pwned\n"}))
    with pytest.raises(LmforgeError, match="unsafe member name"):
        download_corpus(archive, tmp_path / "sub" / "out")
    assert_nothing_left(tmp_path, {"w.zip", "sub"})
    assert list((tmp_path / "sub").iterdir()) == []
    assert not Path("/abs/evil").exists()


def test_tar_with_symlink_is_rejected(splits, tmp_path):
    archive = tmp_path / "w.tar.gz"
    archive.write_bytes(make_tgz(wikitext_layout(splits), links={"wikitext-2/link": "/etc/passwd"}))
    with pytest.raises(LmforgeError, match="links are not allowed"):
        download_corpus(archive, tmp_path / "out")
    assert_nothing_left(tmp_path, {"w.tar.gz"})


# ------------------------------------------------------------------ cache


def test_cache_hit_makes_no_request(server, splits, wikitext_zip, tmp_path):
    server.files["/w.zip"] = wikitext_zip
    cache = tmp_path / "cache"
    pins = {"sha256": sha(wikitext_zip), "size": len(wikitext_zip)}
    first = download_corpus(server.url("/w.zip"), tmp_path / "a", cache_dir=cache, **pins, **FAST)
    assert (cache / "sha256" / sha(wikitext_zip)).read_bytes() == wikitext_zip
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


# ------------------------------------------------------------------ S3 (moto's real HTTP server)


def test_s3_source(splits, wikitext_zip, tmp_path, monkeypatch):
    pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        for k, v in {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        s3.create_bucket(Bucket="corpora")
        s3.put_object(Bucket="corpora", Key="wikitext/wikitext-2-v1.zip", Body=wikitext_zip)

        manifest = download_corpus(
            "s3://corpora/wikitext/wikitext-2-v1.zip", tmp_path / "out", sha256=sha(wikitext_zip), **FAST
        )
        assert_output(tmp_path / "out", splits, manifest)
        with pytest.raises(LmforgeError, match="NoSuchKey"):
            download_corpus("s3://corpora/missing.zip", tmp_path / "out2", **FAST)
    finally:
        moto.stop()


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
