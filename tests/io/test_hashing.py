"""Tests for lmforge.io.hashing against hashlib over the whole bytes (sizes around the read chunk)."""

from __future__ import annotations

import hashlib

import pytest

from lmforge.io.hashing import CHUNK, file_sha256, files_sha256, hash_file


@pytest.mark.parametrize("n", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
def test_hash_file_matches_hashlib(tmp_path, n):
    data = bytes(i % 251 for i in range(n))
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert hash_file(path) == (hashlib.sha256(data).hexdigest(), n)
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


def test_files_sha256_is_the_digest_of_the_bytes_in_order(tmp_path):
    (tmp_path / "a.idx").write_bytes(b"index" * 1000)
    (tmp_path / "a.bin").write_bytes(b"\x00\x01" * CHUNK)
    paths = [tmp_path / "a.idx", tmp_path / "a.bin"]
    assert files_sha256(paths) == hashlib.sha256(b"index" * 1000 + b"\x00\x01" * CHUNK).hexdigest()
    assert files_sha256(reversed(paths)) != files_sha256(paths)
    assert files_sha256([]) == hashlib.sha256(b"").hexdigest()


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        hash_file(tmp_path / "missing")
