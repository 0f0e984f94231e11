"""Seeded, WikiText-shaped text for tests on a machine without ../shared/data.

In: a seed and a number of lines. Out: text laid out as WikiText-2's tokenized
splits are: lines that start and end with a space, tokens separated by single
spaces, punctuation as tokens (" , " " . " " ( " " @-@ " ...), "<unk>" for about
1 token in 20, articles under " = Title = " headings with " = = Section = = "
subheadings, and blank " " lines around every heading. Words follow a Zipf law
(rank r drawn with weight 1/r) within word classes, and sentences follow a
small grammar (determiner, adjective, noun, verb, preposition), so a language
model has something to learn beyond unigram counts.

The same seed gives the same bytes on every machine and every run: only
random.Random.random() is used (Mersenne Twister, fixed across Python versions),
and nothing depends on set or hash order.

    write_splits(Path("corpus-text"))  # valid.txt and test.txt, sized like WikiText-2's
    python tests/synthetic_text.py DIR  # the same from a shell
"""

from __future__ import annotations

import bisect
import itertools
import random
import sys
from pathlib import Path

#: Lines of WikiText-2's valid and test splits; the text below holds about as many tokens
#: (217k and 249k, one end-of-line each included; WikiText-2: 217,646 and 245,569).
SPLIT_LINES = {"valid": 3760, "test": 4358}
SEEDS = {"valid": 2, "test": 3}

DETERMINERS = ["the", "a", "his", "its", "an", "their", "this", "her", "these", "one"]
PREPOSITIONS = ["of", "in", "to", "on", "for", "with", "by", "from", "at", "as", "after", "during", "into"]
CONJUNCTIONS = ["and", "but", "while", "which", "where", "although"]
AUXILIARIES = ["was", "is", "were", "had", "has", "would", "became", "remained"]
# The most frequent words of each class are English (the tests' prompts, e.g. "the game was", are
# then in the vocabulary); the rest are made up.
ENGLISH = {
    "noun": ["game", "album", "song", "season", "year", "city", "war", "team", "film", "church", "species", "river",
             "army", "town", "school", "king", "station", "series", "book", "match", "ship", "battle", "island",
             "road", "band", "house", "world", "family", "player", "state", "music", "record", "story", "name",
             "area", "century", "group", "lobster", "cat", "mat"],
    "verb": ["released", "played", "built", "recorded", "won", "described", "named", "called", "found", "began",
             "made", "used", "took", "moved", "sat", "followed", "reached", "returned", "included", "received"],
    "adj": ["first", "new", "European", "common", "large", "small", "British", "American", "early", "major",
            "final", "original", "second", "local", "national", "several", "main", "other", "only", "united"],
}
# A few words outside ASCII, as WikiText has (names, the en dash of ranges).
NON_ASCII = ["café", "Zürich", "São", "naïve", "Ōsaka", "Dvořák", "fiancée", "Kraków"]

ONSETS = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "st", "tr", "ch"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
SYLLABLES = [o + v for o in ONSETS for v in VOWELS]  # 160
ENDINGS = {"noun": ["", "s", "er", "ion", "ity"], "verb": ["ed", "es", "ing", "ed", "ated"], "adj": ["al", "ic", "ous", "ive", "an"]}
TOPIC_WORDS, TOPIC_SHARE = 8, 0.2  # per article: 8 nouns, a fifth of its nouns
CLASS_SIZES = {"noun": 14_000, "verb": 5_000, "adj": 5_000}  # types per class; most appear once or never


class Zipf:
    """Draws one of `words`, rank r (from 1) with probability proportional to 1 / r**exponent."""

    def __init__(self, words: list[str], exponent: float = 1.05) -> None:
        self.words = words
        self.cumulative = list(itertools.accumulate(1.0 / r**exponent for r in range(1, len(words) + 1)))

    def draw(self, rng: random.Random) -> str:
        i = bisect.bisect_right(self.cumulative, rng.random() * self.cumulative[-1])
        return self.words[min(i, len(self.words) - 1)]


def synthetic_words(kind: str, count: int, taken: set[str]) -> list[str]:
    """`count` distinct words of one class: its English ones, then made-up ones, shortest first (syllables,
    then the class's ending)."""
    words = list(ENGLISH[kind])
    taken.update(words)
    for length in itertools.count(1):
        for syllables in itertools.product(SYLLABLES, repeat=length):
            stem = "".join(syllables)
            word = stem + ENDINGS[kind][len(words) % len(ENDINGS[kind])]
            if word not in taken:
                taken.add(word)
                words.append(word)
                if len(words) == count:
                    return words


def vocabulary() -> dict[str, Zipf]:
    taken = set(DETERMINERS + PREPOSITIONS + CONJUNCTIONS + AUXILIARIES + NON_ASCII)
    nouns = synthetic_words("noun", CLASS_SIZES["noun"], taken)
    # The non-ASCII names sit among the frequent nouns (ranks 40, 80, ...) so that every slice holds some.
    for i, name in enumerate(NON_ASCII):
        nouns.insert(40 * (i + 1), name)
    return {
        "det": Zipf(DETERMINERS, 1.3), "prep": Zipf(PREPOSITIONS, 1.2), "conj": Zipf(CONJUNCTIONS, 1.2),
        "aux": Zipf(AUXILIARIES, 1.1), "noun": Zipf(nouns),
        "verb": Zipf(synthetic_words("verb", CLASS_SIZES["verb"], taken)),
        "adj": Zipf(synthetic_words("adj", CLASS_SIZES["adj"], taken)),
    }


class Writer:
    """One stream of text; `line()` gives the next line, newline included."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.words = vocabulary()
        self.pending: list[str] = []
        self.topic: list[str] = []

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def word(self, kind: str) -> str:
        if kind in ("noun", "verb", "adj") and self.chance(0.05):
            return "<unk>"
        if kind == "noun" and self.topic and self.chance(TOPIC_SHARE):
            return self.topic[int(self.rng.random() * len(self.topic))]
        return self.words[kind].draw(self.rng)

    def number(self) -> list[str]:
        n = 1 + int(self.rng.random() * 2000)
        if self.chance(0.2):
            return [str(n // 1000 or 1), "@,@", f"{n % 1000:03d}"]
        if self.chance(0.2):
            return [str(n % 10), "@.@", str(n % 7)]
        if self.chance(0.15):
            return [str(n), "–", str(n + 1 + n % 9)]
        return [str(n)]

    def noun_phrase(self) -> list[str]:
        phrase = [self.word("det")] if self.chance(0.7) else []
        if self.chance(0.2):
            phrase += self.number()
        if self.chance(0.35):
            phrase.append(self.word("adj"))
        if self.chance(0.08):
            phrase += [self.word("adj"), "@-@", self.word("noun")]
        phrase.append(self.word("noun"))
        if self.chance(0.04):
            phrase += ["'s", self.word("noun")]
        return phrase

    def clause(self) -> list[str]:
        tokens = self.noun_phrase()
        tokens += [self.word("aux"), self.word("verb")] if self.chance(0.4) else [self.word("verb")]
        tokens += self.noun_phrase()
        while self.chance(0.55):
            tokens += [self.word("prep"), *self.noun_phrase()]
        if self.chance(0.08):
            tokens += ["(", *self.noun_phrase(), ")"]
        if self.chance(0.06):
            tokens += ['"', *self.noun_phrase(), '"']
        return tokens

    def sentence(self) -> list[str]:
        tokens = self.clause()
        while self.chance(0.4):
            tokens += [","] + ([self.word("conj")] if self.chance(0.6) else []) + self.clause()
        first = tokens[0]
        tokens[0] = first[:1].upper() + first[1:] if first[:1].isalpha() else first
        return tokens + ["."]

    def title(self, depth: int) -> str:
        words = [self.word("noun") for _ in range(1 + int(self.rng.random() * 3))]
        marks = " ".join(["="] * depth)
        return f" {marks} {' '.join(w[:1].upper() + w[1:] for w in words)} {marks} \n"

    def paragraph(self) -> str:
        tokens = [t for _ in range(1 + int(self.rng.random() * 10)) for t in self.sentence()]
        return " " + " ".join(tokens) + " \n"

    def article(self) -> list[str]:
        # An article's own words (a name, its subject) recur through it, as in an encyclopedia.
        rare = self.words["noun"].words[200:]
        self.topic = [rare[int(self.rng.random() * len(rare))] for _ in range(TOPIC_WORDS)]
        lines = [" \n", self.title(1), " \n"]
        for section in range(1 + int(self.rng.random() * 5)):
            if section:
                lines += [" \n", self.title(2 if self.chance(0.8) else 3), " \n"]
            lines += [self.paragraph() for _ in range(1 + int(self.rng.random() * 4))]
        return lines

    def line(self) -> str:
        if not self.pending:
            self.pending = self.article()[::-1]
        return self.pending.pop()


def wikitext_like(lines: int, seed: int) -> str:
    """`lines` lines of WikiText-shaped text (each ending in a newline), the same for the same seed."""
    writer = Writer(seed)
    return "".join(writer.line() for _ in range(lines))


def write_splits(dest: Path) -> Path:
    """dest/valid.txt and dest/test.txt, stand-ins for WikiText-2's of the same names and line counts."""
    dest.mkdir(parents=True, exist_ok=True)
    for split, lines in SPLIT_LINES.items():
        (dest / f"{split}.txt").write_text(wikitext_like(lines, SEEDS[split]), encoding="utf-8")
    return dest


if __name__ == "__main__":
    print(write_splits(Path(sys.argv[1])))
