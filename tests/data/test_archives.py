"""Tests for lmforge.data.archives: hostile and broken archives are refused before a byte is written.

Hostile archives are built byte by byte where zipfile would refuse to write them;
each is fed to the download stage, which must publish nothing and leave nothing behind.
"""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

from download_fixtures import (  # noqa: F401 (server, splits, wikitext_zip: fixtures)
    FAST, assert_nothing_left, assert_output, make_tgz, make_zip, server, splits, wikitext_layout, wikitext_zip,
)

from lmforge.data.archives import MAX_BYTES, MAX_MEMBERS, Limits, find_split_members, normalize_member
from lmforge.data.download import download_corpus
from lmforge.errors import LmforgeError


# ------------------------------------------------------------------ hostile archives


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

def test_html_page_named_zip(server, tmp_path):
    server.files["/w.zip"] = b"<html>login required</html>"
    with pytest.raises(LmforgeError, match=r"named like a \.zip archive"):
        download_corpus(server.url("/w.zip"), tmp_path / "out", **FAST)
    assert_nothing_left(tmp_path, set())

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



def test_limits_must_be_positive(splits, tmp_path):
    with pytest.raises(LmforgeError, match="must be positive"):
        Limits(max_bytes=0)
    src = tmp_path / "src"
    src.mkdir()
    for s, data in splits.items():
        (src / f"{s}.txt").write_bytes(data)
    with pytest.raises(LmforgeError, match="must be positive"):
        download_corpus(src, tmp_path / "out", max_members=0)
    assert_nothing_left(tmp_path, {"src"})

# ------------------------------------------------------------------ member names


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
