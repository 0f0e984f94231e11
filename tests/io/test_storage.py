"""Tests for lmforge.io.storage against the local disk and a real S3 endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import uuid

import boto3
import pytest

from lmforge.io import storage
from lmforge.errors import IntegrityError, LmforgeError

DATA = bytes(range(256)) * 4000 + "é\n".encode() * 10  # about 1 MB, not a multiple of anything


@pytest.fixture
def bucket(moto_s3):
    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket=name)
    return name


@pytest.fixture
def ranges_requested(moto_s3):
    """Every GetObject's Range header, as botocore sends it (None: the whole object was asked for)."""
    seen: list[str | None] = []

    def record(request, **_):
        value = request.headers.get("Range")
        seen.append(value.decode() if isinstance(value, bytes) else value)

    client = storage.s3_client(moto_s3)
    client.meta.events.register("before-send.s3.GetObject", record)
    yield seen
    client.meta.events.unregister("before-send.s3.GetObject", record)


def test_local_round_trip_is_atomic_and_verified(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    result = storage.put_file(src, tmp_path / "out" / "copy.bin")
    assert result == {"size": len(DATA), "sha256": hashlib.sha256(DATA).hexdigest()}
    assert (tmp_path / "out" / "copy.bin").read_bytes() == DATA
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["copy.bin"]  # no temporary left behind
    assert storage.read_range(tmp_path / "out" / "copy.bin", 10, 20) == DATA[10:20]
    assert b"".join(storage.iter_range(src, 5, len(DATA) + 100, chunk_size=1000)) == DATA[5:]
    assert storage.size(src) == len(DATA) and storage.exists(src) and not storage.exists(tmp_path / "nope")


def test_s3_put_get_list_and_ranges(tmp_path, moto_s3, bucket, ranges_requested):
    src = tmp_path / "d"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(DATA)
    (src / "sub" / "b.txt").write_text("hello\n")
    base = f"s3://{bucket}/runs/x"
    assert storage.put_dir(src, base, endpoint_url=moto_s3) == ["a.bin", "sub/b.txt"]
    assert storage.list_files(base, endpoint_url=moto_s3) == ["a.bin", "sub/b.txt"]
    head = boto3.client("s3", endpoint_url=moto_s3).head_object(Bucket=bucket, Key="runs/x/a.bin")
    assert head["Metadata"][storage.SHA256_METADATA] == hashlib.sha256(DATA).hexdigest()

    uri = storage.join(base, "a.bin")
    assert storage.size(uri, endpoint_url=moto_s3) == len(DATA)
    assert storage.read_range(uri, 1000, 1010, endpoint_url=moto_s3) == DATA[1000:1010]
    assert storage.read_text(storage.join(base, "sub", "b.txt"), endpoint_url=moto_s3) == "hello\n"
    assert b"".join(storage.iter_range(uri, 7, 70_007, chunk_size=4096, endpoint_url=moto_s3)) == DATA[7:70_007]
    assert storage.read_range(uri, len(DATA) + 5, len(DATA) + 9, endpoint_url=moto_s3) == b""
    # Each read asked for its own range only, never the whole object.
    assert ranges_requested == ["bytes=1000-1009", "bytes=0-5", "bytes=7-70006", f"bytes={len(DATA) + 5}-{len(DATA) + 8}"]

    names = storage.get_dir(base, tmp_path / "back", endpoint_url=moto_s3)
    assert names == ["a.bin", "sub/b.txt"]
    assert (tmp_path / "back" / "a.bin").read_bytes() == DATA
    assert (tmp_path / "back" / "sub" / "b.txt").read_text() == "hello\n"


def test_s3_download_that_does_not_match_its_digest_is_discarded(tmp_path, moto_s3, bucket):
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    s3.put_object(Bucket=bucket, Key="k", Body=b"abc", Metadata={storage.SHA256_METADATA: "0" * 64})
    with pytest.raises(IntegrityError, match="does not match"):
        storage.get_file(f"s3://{bucket}/k", tmp_path / "k", endpoint_url=moto_s3)
    assert list(tmp_path.iterdir()) == []


def test_missing_locations_are_one_line_errors(tmp_path, moto_s3, bucket):
    with pytest.raises(LmforgeError, match="does not exist"):
        storage.get_file(f"s3://{bucket}/missing", tmp_path / "m", endpoint_url=moto_s3)
    with pytest.raises(LmforgeError, match="holds no files"):
        storage.get_dir(f"s3://{bucket}/empty", tmp_path / "e", endpoint_url=moto_s3)
    with pytest.raises(LmforgeError, match="storage locations"):
        storage.size("https://example.com/x")
    assert not storage.exists(f"s3://{bucket}/missing", endpoint_url=moto_s3)
    storage.delete(f"s3://{bucket}/missing", endpoint_url=moto_s3)  # deleting nothing is fine


def test_join_and_kinds(tmp_path):
    assert storage.join("s3://b/runs", "x", "y.bin") == "s3://b/runs/x/y.bin"
    assert storage.join(str(tmp_path), "x") == str(tmp_path / "x")
    assert storage.is_remote("s3://b/k") and not storage.is_remote(tmp_path)
    assert storage.local_path(f"file://{tmp_path}") == tmp_path and storage.local_path("s3://b/k") is None


def test_put_text_writes_atomically_locally_and_verified_on_s3(tmp_path, moto_s3, bucket):
    text = '{"é": 1}\n'
    result = storage.put_text(text, tmp_path / "run" / "config.json")
    assert result == {"size": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    assert (tmp_path / "run" / "config.json").read_text(encoding="utf-8") == text
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.json"]  # no temporary left behind
    storage.put_text("newer\n", tmp_path / "run" / "config.json")  # a rewrite replaces the file whole
    assert (tmp_path / "run" / "config.json").read_text() == "newer\n"

    uri = f"s3://{bucket}/runs/x/config.json"
    assert storage.put_text(text, uri, endpoint_url=moto_s3) == result
    assert storage.read_text(uri, endpoint_url=moto_s3) == text
    head = boto3.client("s3", endpoint_url=moto_s3).head_object(Bucket=bucket, Key="runs/x/config.json")
    assert head["Metadata"][storage.SHA256_METADATA] == result["sha256"]
