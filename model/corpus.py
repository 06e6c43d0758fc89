"""The project's training corpus, generated deterministically and shipped as model/data/corpus.txt.

Nothing is downloaded: the corpus is hand-written passages (model/data/passages.txt: English prose,
dialogue, a letter, a little French/German/Spanish, CJK, Cyrillic, Greek and emoji) interleaved
with generated material that exercises what a lossless tokenizer must handle: numbers, dates,
times, prices, arithmetic, aligned tables (runs of spaces), tab-indented and space-indented code,
JSON and shell lines. `random.Random(seed)` makes it the same bytes on every Python 3.

Regenerate with `python -m model.corpus` (tests/test_tokenizer.py fails when the shipped file is
stale).
"""

from __future__ import annotations

import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
PASSAGES_PATH = DATA_DIR / "passages.txt"
CORPUS_PATH = DATA_DIR / "corpus.txt"
SEED = 20221122

_NAMES = ["Marta", "Tom", "Priya", "Helen", "Kwame", "Yuki", "Omar", "Ines", "Lars", "Chen", "Amara", "Diego"]
_PLACES = ["Lisbon", "Oslo", "Nairobi", "Osaka", "Quito", "Leeds", "Hanoi", "Perth", "Tunis", "Bergen"]
_THINGS = ["apples", "books", "chairs", "lamps", "tickets", "bottles", "stamps", "shirts", "candles", "maps"]
_ADJECTIVES = ["small", "old", "bright", "quiet", "heavy", "narrow", "warm", "blue", "careful", "early"]
_VERBS = ["bought", "sold", "found", "counted", "packed", "painted", "lost", "borrowed", "mended", "sorted"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_UNITS = [("kilometres", "km"), ("metres", "m"), ("kilograms", "kg"), ("litres", "l"), ("minutes", "min")]


def _sentence(rng: random.Random) -> str:
    name, place = rng.choice(_NAMES), rng.choice(_PLACES)
    n, thing, adjective, verb = rng.randint(2, 999), rng.choice(_THINGS), rng.choice(_ADJECTIVES), rng.choice(_VERBS)
    unit, short = rng.choice(_UNITS)
    templates = [
        f"{name} {verb} {n} {adjective} {thing} in {place}.",
        f"On {rng.choice(_WEEKDAYS)} {rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1950, 2030)}, "
        f"{name} travelled {rng.randint(5, 950)} kilometres to {place}.",
        f"The train to {place} leaves at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} from platform "
        f"{rng.randint(1, 12)}.",
        f"A box of {n} {thing} costs {rng.randint(1, 400)}.{rng.randint(0, 99):02d} euros, "
        f"or {rng.randint(1, 9)} for a {adjective} one.",
        f"{name} measured {rng.randint(1, 9999) / 10:.1f} {short} ({unit}) and wrote it down twice.",
        f"In {rng.randint(1900, 2025)} the population of {place} was about {rng.randint(10, 9999) * 1000:,}.",
        f"\"Where are the {adjective} {thing}?\" asked {name}. \"In {place},\" said {rng.choice(_NAMES)}.",
        f"Call {name} on +{rng.randint(1, 99)} {rng.randint(100, 999)} {rng.randint(1000, 9999)} before "
        f"{rng.randint(1, 12)} o'clock.",
        f"{name} has {n} {thing}; {rng.choice(_NAMES)} has {n + rng.randint(1, 50)}, which is more.",
        f"The {adjective} road from {place} to {rng.choice(_PLACES)} is {rng.randint(3, 800)} km long.",
    ]
    return rng.choice(templates)


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(1, 99)
    op = rng.choice(["+", "-", "*", "/"])
    value = {"+": a + b, "-": a - b, "*": a * b, "/": round(a / b, 3)}[op]
    return f"{a} {op} {b} = {value}"


def _table(rng: random.Random) -> str:
    rows = [f"{'item':<12}{'count':>8}{'price':>10}"]
    for _ in range(rng.randint(3, 6)):
        rows.append(f"{rng.choice(_THINGS):<12}{rng.randint(1, 500):>8}{rng.randint(1, 9999) / 100:>10.2f}")
    return "\n".join(rows)


def _python(rng: random.Random) -> str:
    fn, arg, thing = rng.choice(["total", "scale", "count_items", "mean", "clip"]), rng.choice(["xs", "values"]), rng.choice(_THINGS)
    k = rng.randint(2, 64)
    bodies = [
        f"def {fn}({arg}):\n    result = 0\n    for x in {arg}:\n        result += x * {k}\n    return result\n",
        f"def {fn}({arg}, limit={k}):\n    \"\"\"Return the {thing} below limit.\"\"\"\n"
        f"    return [x for x in {arg} if x < limit]\n",
        f"class {thing.title()}Store:\n    def __init__(self):\n        self.items = {{}}\n\n"
        f"    def add(self, key, n={k}):\n        self.items[key] = self.items.get(key, 0) + n\n",
        f"for i in range({k}):\n    if i % {rng.randint(2, 9)} == 0:\n        print(f\"{{i:>4}} {thing}\")\n",
    ]
    return rng.choice(bodies)


def _other_code(rng: random.Random) -> str:
    name, n = rng.choice(_NAMES).lower(), rng.randint(1, 4096)
    snippets = [
        f"int {name}_sum(const int *a, int n) {{\n\tint s = 0;\n\tfor (int i = 0; i < n; i++)\n\t\ts += a[i];\n"
        f"\treturn s + {n};\n}}\n",
        f'{{"name": "{name}", "id": {n}, "tags": ["{rng.choice(_THINGS)}", "{rng.choice(_ADJECTIVES)}"], '
        f'"ratio": {rng.random():.4f}}}',
        f"$ mkdir -p /tmp/{name} && cd /tmp/{name}\n$ echo {n} > count.txt\n$ cat count.txt\n{n}",
        f"SELECT {name}, COUNT(*) FROM orders WHERE total > {n} GROUP BY {name};",
    ]
    return rng.choice(snippets)


def generate_corpus(seed: int = SEED, n_blocks: int = 1200) -> str:
    """The corpus text: passages interleaved with `n_blocks` generated blocks, fixed by `seed`."""
    rng = random.Random(seed)
    passages = [p.strip("\n") for p in PASSAGES_PATH.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    every = max(1, n_blocks // len(passages))  # spread every passage through the corpus, once
    blocks: list[str] = []
    for i in range(n_blocks):
        if i % every == 0 and i // every < len(passages):
            blocks.append(passages[i // every])
        kind = rng.random()
        if kind < 0.55:
            blocks.append(" ".join(_sentence(rng) for _ in range(rng.randint(2, 5))))
        elif kind < 0.65:
            blocks.append("\n".join(_arithmetic(rng) for _ in range(rng.randint(3, 8))))
        elif kind < 0.72:
            blocks.append(_table(rng))
        elif kind < 0.88:
            blocks.append(_python(rng).rstrip("\n"))
        else:
            blocks.append(_other_code(rng))
    return "\n\n".join(blocks) + "\n"


def load_corpus() -> str:
    """The shipped corpus text."""
    return CORPUS_PATH.read_text(encoding="utf-8")


def main() -> None:
    """Rewrites model/data/corpus.txt."""
    text = generate_corpus()
    CORPUS_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {CORPUS_PATH} ({len(text.encode('utf-8'))} bytes)")


if __name__ == "__main__":
    main()
