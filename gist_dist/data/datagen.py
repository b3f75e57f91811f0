"""Offline instruction data: task families with paraphrased instructions and exact answers.

Every answer is computed from the input, so the data is free, deterministic for a seed, and a
model can learn it. Families are split into `seen` (train and seen-eval) and `unseen` (held out
entirely) so generalisation to new instructions can be measured, as in the paper's splits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud piano tiger lemon candle forest silver window rocket garden "
    "orange pencil marble castle dragon ocean violet summer winter bridge meadow falcon "
    "copper harbor jungle lantern mirror nickel planet quartz saddle thunder velvet walnut"
).split()


def _words(rng, lo=3, hi=7):
    return rng.sample(WORDS, rng.randint(lo, hi))


def _nums(rng, lo=3, hi=7):
    return [rng.randint(0, 99) for _ in range(rng.randint(lo, hi))]


def words(lo=3, hi=7):
    """An input maker: lo to hi distinct words."""
    return lambda rng: " ".join(_words(rng, lo, hi))


def numbers(lo=3, hi=7):
    """An input maker: lo to hi numbers from 0 to 99."""
    return lambda rng: " ".join(map(str, _nums(rng, lo, hi)))


# family name -> (paraphrased instructions, input maker, answer function)
FAMILIES = {
    "reverse_words": (
        [
            "Reverse the order of the words.",
            "Write the words in reverse order.",
            "List these words from last to first.",
        ],
        words(),
        lambda x: " ".join(x.split()[::-1]),
    ),
    "uppercase": (
        ["Convert the text to upper case.", "Rewrite the text in capital letters.", "Make every letter uppercase."],
        words(),
        str.upper,
    ),
    "count_words": (
        ["How many words are in the text?", "Count the words.", "Give the number of words in the input."],
        words(2, 9),
        lambda x: str(len(x.split())),
    ),
    "sort_numbers": (
        [
            "Sort the numbers in ascending order.",
            "Order these numbers from smallest to largest.",
            "Arrange the numbers in increasing order.",
        ],
        numbers(),
        lambda x: " ".join(map(str, sorted(map(int, x.split())))),
    ),
    "sum_numbers": (
        ["Add up the numbers.", "What is the sum of these numbers?", "Compute the total of the numbers."],
        numbers(2, 5),
        lambda x: str(sum(map(int, x.split()))),
    ),
    "max_number": (
        ["Which number is the largest?", "Find the maximum.", "Give the biggest number in the list."],
        numbers(),
        lambda x: str(max(map(int, x.split()))),
    ),
    "first_word": (
        ["What is the first word?", "Repeat only the first word.", "Give the word that comes first."],
        words(),
        lambda x: x.split()[0],
    ),
    "last_word": (
        ["What is the last word?", "Repeat only the final word.", "Give the word that comes last."],
        words(),
        lambda x: x.split()[-1],
    ),
    "sort_words": (
        ["Sort the words alphabetically.", "Put the words in alphabetical order.", "Arrange the words from A to Z."],
        words(),
        lambda x: " ".join(sorted(x.split())),
    ),
    "initials": (
        ["Give the first letter of each word.", "Write the initials of the words.", "List each word's first letter."],
        words(),
        lambda x: " ".join(w[0] for w in x.split()),
    ),
    "min_number": (
        ["Which number is the smallest?", "Find the minimum.", "Give the smallest number in the list."],
        numbers(),
        lambda x: str(min(map(int, x.split()))),
    ),
    "double_numbers": (
        ["Double each number.", "Multiply every number by two.", "Write each number times 2."],
        numbers(2, 5),
        lambda x: " ".join(str(2 * int(n)) for n in x.split()),
    ),
    "word_lengths": (
        [
            "Give the length of each word.",
            "How many letters does each word have?",
            "Write the letter count of every word.",
        ],
        words(),
        lambda x: " ".join(str(len(w)) for w in x.split()),
    ),
    "duplicate_words": (
        ["Write each word twice.", "Repeat every word two times.", "Double each word."],
        words(2, 4),
        lambda x: " ".join(w + " " + w for w in x.split()),
    ),
}
UNSEEN = ("min_number", "double_numbers", "word_lengths", "duplicate_words")
SEEN = tuple(f for f in FAMILIES if f not in UNSEEN)


def generate(n: int, split: str = "seen", seed: int = 0) -> list[dict]:
    """n Alpaca-format records from the `seen` or `unseen` families."""
    families = {"seen": SEEN, "unseen": UNSEEN, "all": tuple(FAMILIES)}[split]
    rng = random.Random(f"{split}-{seed}")
    records = []
    for _ in range(n):
        fam = rng.choice(families)
        instructions, make_input, answer = FAMILIES[fam]
        x = make_input(rng)
        records.append({"instruction": rng.choice(instructions), "input": x, "output": answer(x), "task": fam})
    return records


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
