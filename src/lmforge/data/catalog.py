"""Named corpora lmforge knows how to fetch: where from, which bytes, which members.

In:  a corpus name such as `wikitext-2`. Out: a `CatalogEntry` with the official
     download locations (tried in order), the pinned size and sha256 of the
     archive, and the archive member holding each split. Pure data and pure
     functions, no I/O: `download_corpus(source="wikitext-103", ...)` resolves a
     name here, then fetches, verifies and unpacks with those pins.

    lmforge corpora                     # the table format_catalog() prints
    lmforge download --source wikitext-2 --out data/wikitext-2

Pins are the published facts about the official archives (Merity et al., 2016;
see shared/data/README.md): a mirror that serves other bytes is rejected.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType


# The two official homes of WikiText, in the order tried: the author's current
# site first (it is where the dataset page now links), then the original
# Salesforce/MetaMind S3 bucket, which still serves the same bytes.
WIKITEXT_MIRRORS = (
    "https://wikitext.smerity.com/{archive}",
    "https://s3.amazonaws.com/research.metamind.io/wikitext/{archive}",
)

OFFLINE_HINT = "offline? pass a local corpus with --corpus DIR (train.txt, valid.txt, test.txt)"


@dataclass(frozen=True)
class CatalogEntry:
    """One named corpus: an archive at one or more locations, pinned, with its split members."""

    name: str
    archive: str  # file name of the archive, e.g. wikitext-2-v1.zip
    size: int  # bytes of the archive
    sha256: str  # of the archive
    locations: tuple[str, ...]  # URIs tried in order
    members: Mapping[str, str]  # split -> member inside the archive
    description: str = ""
    licence: str = ""


def _wikitext(name: str, archive: str, size: int, sha256: str, description: str) -> CatalogEntry:
    ext = "raw" if name.endswith("-raw") else "tokens"
    return CatalogEntry(
        name=name,
        archive=archive,
        size=size,
        sha256=sha256,
        locations=tuple(m.format(archive=archive) for m in WIKITEXT_MIRRORS),
        members=MappingProxyType({s: f"{name}/wiki.{s}.{ext}" for s in ("train", "valid", "test")}),
        description=description,
        licence="CC BY-SA 3.0 (Merity et al., 2016)",
    )


# Sizes and digests: shared/data/README.md, "Published facts about the official archives".
CATALOG: Mapping[str, CatalogEntry] = MappingProxyType(
    {
        e.name: e
        for e in (
            _wikitext(
                "wikitext-2",
                "wikitext-2-v1.zip",
                4_475_746,
                "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",
                "WikiText-2, tokenized (<unk> for rare words); 2M training tokens",
            ),
            _wikitext(
                "wikitext-2-raw",
                "wikitext-2-raw-v1.zip",
                4_721_645,
                "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
                "WikiText-2, raw characters (no <unk>)",
            ),
            _wikitext(
                "wikitext-103",
                "wikitext-103-v1.zip",
                190_229_076,
                "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
                "WikiText-103, tokenized; 103M training tokens",
            ),
            _wikitext(
                "wikitext-103-raw",
                "wikitext-103-raw-v1.zip",
                191_984_949,
                "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794",
                "WikiText-103, raw characters (no <unk>)",
            ),
        )
    }
)


def list_corpora(catalog: Mapping[str, CatalogEntry] | None = None) -> list[CatalogEntry]:
    """Every catalog entry, sorted by name (what `lmforge corpora` shows)."""
    return [e for _, e in sorted((catalog if catalog is not None else CATALOG).items())]


def lookup(name: str, catalog: Mapping[str, CatalogEntry] | None = None) -> CatalogEntry | None:
    """The entry called exactly `name`, or None.

    Only bare names match: `./wikitext-2` or any string holding a path separator
    or a scheme is a location, so a local folder that happens to share a
    catalog name stays reachable.
    """
    if "/" in name or "\\" in name or ":" in name:
        return None
    return (catalog if catalog is not None else CATALOG).get(name)


def suggest(name: str, catalog: Mapping[str, CatalogEntry] | None = None) -> str | None:
    """The catalog name closest to a mistyped one (`wikitext2` -> `wikitext-2`), if any is close."""
    if "/" in name or "\\" in name or ":" in name:
        return None
    hits = difflib.get_close_matches(name.lower(), list(catalog if catalog is not None else CATALOG), n=1, cutoff=0.8)
    return hits[0] if hits else None


def unreachable_message(name: str, tried: Iterable[str]) -> str:
    """The one line printed when no location of a catalog corpus answered."""
    return f"could not reach {name}: tried {', '.join(tried)}; {OFFLINE_HINT}"


def format_catalog(entries: Iterable[CatalogEntry]) -> str:
    """A plain-text table: name, archive size, sha256, description, then each location indented."""
    rows = list(entries)
    if not rows:
        return "no corpora in the catalog"
    width = max(len(e.name) for e in rows)
    lines = []
    for e in rows:
        lines.append(f"{e.name:<{width}}  {_human(e.size):>9}  sha256 {e.sha256}  {e.description}")
        lines.extend(f"{'':<{width}}  from {loc}" for loc in e.locations)
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_entry(entry: CatalogEntry) -> list[str]:
    """Problems with a (possibly user-built) entry: bad pins, no locations, unknown splits."""
    problems = []
    if len(entry.sha256) != 64 or any(c not in "0123456789abcdef" for c in entry.sha256):
        problems.append(f"{entry.name}: sha256 {entry.sha256!r} is not 64 lowercase hex digits")
    if entry.size <= 0:
        problems.append(f"{entry.name}: size {entry.size} must be positive")
    if not entry.locations:
        problems.append(f"{entry.name}: no locations")
    if set(entry.members) != {"train", "valid", "test"}:
        problems.append(f"{entry.name}: members must name train, valid and test, not {sorted(entry.members)}")
    return problems

