"""Tests for lmforge.io.staging on the local disk and on a real S3 endpoint (moto's server on 127.0.0.1):
nothing shows at a destination before its block ends, a failure keeps the old output, `last` lands last."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import boto3
import pytest

from lmforge.io import staging, storage
from lmforge.io.staging import fetched_dir, fetched_file, replace_dir, staged_dir


@pytest.fixture
def s3_base(moto_s3, monkeypatch):
    """A fresh prefix in a fresh bucket; staging reads the endpoint from AWS_ENDPOINT_URL, as a step does."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs/x"


@pytest.fixture
def puts(moto_s3):
    """The keys of every PutObject, in the order botocore sends them."""
    keys: list[str] = []

    def record(params, **_):
        keys.append(params["Key"])

    client = storage.s3_client(moto_s3)
    client.meta.events.register("before-parameter-build.s3.PutObject", record)
    yield keys
    client.meta.events.unregister("before-parameter-build.s3.PutObject", record)


def write_files(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


def tree(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ staged_dir, local


def test_local_output_appears_only_when_the_block_ends(tmp_path):
    dest = tmp_path / "out" / "corpus"
    with staged_dir(dest, last="manifest.json") as stage:
        write_files(stage, {"train.txt": "a\n", "sub/b.txt": "b\n", "manifest.json": "{}"})
        assert not dest.exists()
        assert stage.parent == dest.parent  # a sibling: the publishing rename stays on one filesystem
    assert tree(dest) == {"manifest.json": "{}", "sub/b.txt": "b\n", "train.txt": "a\n"}
    assert [p.name for p in dest.parent.iterdir()] == ["corpus"]  # no staging folder left


def test_local_failure_keeps_the_old_output(tmp_path):
    dest = tmp_path / "corpus"
    write_files(dest, {"train.txt": "old\n"})
    with pytest.raises(RuntimeError, match="half-way"):
        with staged_dir(dest) as stage:
            write_files(stage, {"train.txt": "new\n"})
            raise RuntimeError("half-way")
    assert tree(dest) == {"train.txt": "old\n"}
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]


def test_local_rerun_replaces_the_old_output(tmp_path):
    dest = tmp_path / "corpus"
    write_files(dest, {"train.txt": "old\n", "stale.txt": "gone\n"})
    with staged_dir(f"file://{dest}") as stage:
        write_files(stage, {"train.txt": "new\n"})
    assert tree(dest) == {"train.txt": "new\n"}
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]


# ------------------------------------------------------------------ staged_dir, S3


def test_s3_output_appears_only_when_the_block_ends_and_last_is_last(s3_base, puts):
    with staged_dir(s3_base, last="manifest.json") as stage:
        write_files(stage, {"manifest.json": "{}", "train.txt": "a\n", "z.txt": "z\n", "sub/b.txt": "b\n"})
        assert storage.list_files(s3_base) == []
    assert storage.list_files(s3_base) == ["manifest.json", "sub/b.txt", "train.txt", "z.txt"]
    assert storage.read_text(storage.join(s3_base, "sub", "b.txt")) == "b\n"
    prefix = s3_base.split("/", 3)[3] + "/"
    assert puts == [prefix + n for n in ("sub/b.txt", "train.txt", "z.txt", "manifest.json")]
    assert not stage.exists()  # the local staging folder is gone


def test_s3_failure_uploads_nothing_and_keeps_the_old_output(s3_base, tmp_path, puts):
    old = tmp_path / "old.txt"
    old.write_text("old\n")
    storage.put_file(old, storage.join(s3_base, "train.txt"))
    puts.clear()
    with pytest.raises(RuntimeError):
        with staged_dir(s3_base) as stage:
            write_files(stage, {"train.txt": "new\n", "valid.txt": "new\n"})
            raise RuntimeError("half-way")
    assert puts == []
    assert storage.list_files(s3_base) == ["train.txt"]
    assert storage.read_text(storage.join(s3_base, "train.txt")) == "old\n"
    assert not stage.exists()


# ------------------------------------------------------------------ fetched_dir, fetched_file


def test_local_locations_are_read_in_place(tmp_path):
    write_files(tmp_path / "bin", {"dict.txt": "a 1\n"})
    with fetched_dir(tmp_path / "bin") as local:
        assert local == tmp_path / "bin"
    with fetched_dir(f"file://{tmp_path / 'bin'}", ["dict.txt"]) as local:
        assert local == tmp_path / "bin"
    with fetched_file(tmp_path / "bin" / "dict.txt") as local:
        assert local == tmp_path / "bin" / "dict.txt"
    assert tree(tmp_path) == {"bin/dict.txt": "a 1\n"}  # nothing copied, nothing removed


def test_s3_directories_are_copied_and_the_copy_removed(s3_base, tmp_path):
    write_files(tmp_path / "src", {"dict.txt": "a 1\n", "train.bin": "xx", "sub/c.txt": "c\n"})
    storage.put_dir(tmp_path / "src", s3_base)
    with fetched_dir(s3_base) as local:
        assert tree(local) == {"dict.txt": "a 1\n", "sub/c.txt": "c\n", "train.bin": "xx"}
        copy = local
    assert not copy.exists()
    with fetched_dir(s3_base, ["dict.txt"]) as local:
        assert tree(local) == {"dict.txt": "a 1\n"}  # only the names asked for
    assert not local.exists()


def test_s3_file_is_copied_under_its_own_name(s3_base, tmp_path):
    (tmp_path / "checkpoint_best.pt").write_bytes(b"weights")
    uri = storage.join(s3_base, "checkpoint_best.pt")
    storage.put_file(tmp_path / "checkpoint_best.pt", uri)
    with fetched_file(uri) as local:
        assert local.name == "checkpoint_best.pt" and local.read_bytes() == b"weights"
    assert not local.exists()


# ------------------------------------------------------------------ replace_dir


def test_replace_dir_puts_the_old_output_back_when_the_rename_fails(tmp_path, monkeypatch):
    new, dest = tmp_path / "new", tmp_path / "dest"
    write_files(new, {"f": "new"})
    write_files(dest, {"f": "old"})
    real_replace, calls = os.replace, []

    def replace(a, b):
        if Path(a) == new:
            calls.append(b)
            if len(calls) == 2:  # the first fails by itself (dest is not empty); the retry fails here
                raise OSError(errno.EIO, "disk gone")
        return real_replace(a, b)

    monkeypatch.setattr(staging.os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        replace_dir(new, dest)
    assert tree(dest) == {"f": "old"} and tree(new) == {"f": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "new"]  # the set-aside folder is gone
