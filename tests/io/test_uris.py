"""Tests for lmforge.io.uris: classifying locations and keeping credentials out of what is printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.io.uris import HTTP, LOCAL, S3, parse_location, redact


@pytest.mark.parametrize("text", ["data/corpus", "/abs/corpus", "./wikitext-2", "wikitext-2.zip"])
def test_local_paths(text):
    loc = parse_location(text)
    assert (loc.kind, loc.path, loc.uri) == (LOCAL, Path(text), text)
    assert not loc.is_remote and loc.display == text and loc.name == Path(text).name


def test_home_is_expanded_and_a_path_object_is_always_local(tmp_path):
    assert parse_location("~/corpus").path == Path.home() / "corpus"
    # A Path whose text looks like a URI is still a path (a folder named "s3:").
    odd = Path("s3:") / "bucket"
    assert parse_location(odd).kind == LOCAL and parse_location(odd).path == odd
    assert parse_location(f"  {tmp_path}  ").path == tmp_path  # surrounding blanks are a typo, not a name


def test_file_uris():
    loc = parse_location("file:///srv/data/my%20corpus.zip")
    assert (loc.kind, loc.path, loc.name) == (LOCAL, Path("/srv/data/my corpus.zip"), "my corpus.zip")
    assert parse_location("file://localhost/srv/x").path == Path("/srv/x")
    with pytest.raises(LmforgeError, match="must name a local path .*'fileserver'"):
        parse_location("file://fileserver/share/x")


def test_s3_uris_keep_every_character_of_the_key():
    loc = parse_location("s3://corpora/wikitext/v1?#.zip")
    assert (loc.kind, loc.bucket, loc.key, loc.name) == (S3, "corpora", "wikitext/v1?#.zip", "v1?#.zip")
    assert loc.is_remote and loc.display == loc.uri and loc.path is None
    for bad in ["s3://", "s3://bucket", "s3://bucket/", "s3:///key"]:
        with pytest.raises(LmforgeError, match="s3://bucket/key"):
            parse_location(bad)


def test_http_uris():
    loc = parse_location("HTTPS://example.org/dl/wikitext-2-v1.zip?id=3")
    assert (loc.kind, loc.name) == (HTTP, "wikitext-2-v1.zip") and loc.is_remote
    assert parse_location("http://example.org/a%20b.txt").name == "a b.txt"
    with pytest.raises(LmforgeError, match="no host"):
        parse_location("http:///x.zip")


@pytest.mark.parametrize("bad, why", [("", "empty location"), ("   ", "empty location"), ("ftp://h/x", "unsupported scheme 'ftp'")])
def test_bad_inputs_are_one_line_errors(bad, why):
    with pytest.raises(LmforgeError, match=why) as err:
        parse_location(bad)
    assert "\n" not in str(err.value)


def test_redact_hides_passwords_and_secret_query_values():
    url = "https://user:hunter2@example.org/w.zip?X-Amz-Signature=abc&X-Amz-Credential=AKIA&part=1&token=t0k"
    assert redact(url) == "https://user:***@example.org/w.zip?X-Amz-Signature=***&X-Amz-Credential=***&part=1&token=***"
    assert redact("https://user@example.org/w.zip") == "https://user@example.org/w.zip"  # no password, nothing hidden
    assert redact("https://example.org/w.zip?sig=1&Sig=2&keep=3") == "https://example.org/w.zip?sig=***&Sig=***&keep=3"
    assert redact("https://example.org/w.zip?flag&key=") == "https://example.org/w.zip?flag&key=***"
    assert parse_location(url).display == redact(url) and "hunter2" not in parse_location(url).display


def test_redact_leaves_what_holds_no_secrets():
    for text in ["s3://bucket/key?token=x", "/local/path?token=x", "file:///x?token=y"]:
        assert redact(text) == text
