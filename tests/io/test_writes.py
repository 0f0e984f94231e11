"""lmforge.io.writes and the io write paths on a disk that really fills up (a small tmpfs, see
tests/full_disk.py) or is really read-only: one line naming the destination and the space left,
no temporary file behind, earlier output as it was. S3 staging runs against moto's server."""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
import uuid

import boto3
import pytest

from full_disk import contents, listing, small_disk  # noqa: F401 (small_disk: a fixture)
from lmforge.io import storage
from lmforge.io.staging import staged_dir
from lmforge.io.writes import WriteError, human_bytes, write_error, writing

KIB = 1024


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1536, 64 * KIB, 5 << 30)] == ["0 B", "1023 B", "1.5 KiB", "64.0 KiB",
                                                                            "5.0 GiB"]


def test_which_errors_are_refused_writes(tmp_path):
    dest = tmp_path / "out"
    full = write_error(OSError(errno.ENOSPC, "No space left on device"), dest, needed=3 * KIB)
    assert isinstance(full, WriteError) and str(full).startswith(f"cannot write {dest}: no space left on the device (")
    assert "3.0 KiB needed); free space there or choose another destination" in str(full)
    assert "read-only file system; choose a writable destination" in str(
        write_error(OSError(errno.EROFS, "Read-only file system"), dest))
    # permission errors count only on what lmforge writes: the destination, a parent it creates, its staging sibling
    for ours in (dest / "a.txt", tmp_path, tmp_path / ".out.tmp-1" / "train.txt", tmp_path / ".preprocess-x"):
        assert write_error(PermissionError(errno.EACCES, "Permission denied", str(ours)), dest) is not None, ours
    assert write_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "corpus" / "train.txt")),
                       dest) is None, "a source it cannot read is no write error"
    assert write_error(OSError(errno.EIO, "I/O error"), dest) is None


def test_an_inner_error_is_named_after_the_outer_destination_it_wrote_for(tmp_path):
    dest = tmp_path / "data-bin"
    with pytest.raises(WriteError) as info:
        with writing(dest), writing(tmp_path / ".preprocess-1" / "count" / "00000"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value).startswith(f"cannot write {dest}: no space left")
    with pytest.raises(WriteError) as info:  # another destination's failure keeps its own name
        with writing(dest), writing(tmp_path / "elsewhere"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value).startswith(f"cannot write {tmp_path / 'elsewhere'}: ")
    error = pickle.loads(pickle.dumps(info.value))  # a preprocess worker process raises it to the pool
    assert str(error) == str(info.value) and error.exit_code == 1


def test_put_file_on_a_full_disk_names_the_file_and_the_space(small_disk, tmp_path):
    disk = small_disk("64k")
    (disk / "metrics.json").write_bytes(b"earlier\n")
    big = tmp_path / "big"
    big.write_bytes(os.urandom(100 * KIB))
    with pytest.raises(WriteError) as info:
        storage.put_file(big, disk / "metrics.json")
    message = str(info.value)
    assert message.startswith(f"cannot write {disk / 'metrics.json'}: no space left on the device (")
    assert "KiB free, 100.0 KiB needed)" in message
    assert listing(disk) == {"metrics.json": 8}, "no .part file left, the earlier file intact"
    with pytest.raises(WriteError, match="no space left"):
        storage.get_file(big, disk / "copy")
    assert listing(disk) == {"metrics.json": 8}


def test_put_text_on_a_read_only_disk(small_disk):
    disk = small_disk("64k", read_only=True)
    with pytest.raises(WriteError) as info:
        storage.put_text("{}", disk / "eval" / "metrics.json")
    assert str(info.value) == f"cannot write {disk / 'eval' / 'metrics.json'}: read-only file system; " \
                              "choose a writable destination"


def test_staged_dir_on_a_full_disk_keeps_the_earlier_output(small_disk):
    disk = small_disk("64k")
    dest = disk / "out"
    with staged_dir(dest) as tmp:
        (tmp / "a.txt").write_text("earlier")
    with pytest.raises(WriteError) as info:
        with staged_dir(dest) as tmp:
            (tmp / "a.txt").write_bytes(os.urandom(200 * KIB))
    assert str(info.value).startswith(f"cannot write {dest}: no space left on the device (")
    assert contents(disk) == {"out/a.txt": b"earlier"}


def test_s3_staging_on_a_full_temporary_disk_says_where_it_staged(small_disk, moto_s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket=bucket)
    disk = small_disk("64k")
    monkeypatch.setattr(tempfile, "tempdir", str(disk))  # what TMPDIR does for a new process
    uri = f"s3://{bucket}/work/count/00000"
    with pytest.raises(WriteError) as info:
        with staged_dir(uri, last="shard.json") as tmp:
            (tmp / "train.ids").write_bytes(os.urandom(200 * KIB))
    message = str(info.value)
    assert message.startswith(f"cannot write {uri} (staged in {disk}/lmforge-stage-")
    assert message.endswith("free); free space there or point TMPDIR at a larger disk")
    assert storage.list_files(uri) == [] and listing(disk) == {}
