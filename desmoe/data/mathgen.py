"""Generated arithmetic and word problems with exact integer answers (the built-in ``math`` domain).

A problem's identity is its question text: the train/validation/test split hashes it, so the three splits are
disjoint whatever seeds produced them, and the same on every machine.
"""
from __future__ import annotations

import random

from ._util import check_split, split_of, stable_hash

_NAMES = ("Alice", "Bob", "Carol", "Dan", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar",
          "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Wendy", "Yusuf", "Zoe")
_ITEMS = ("apples", "books", "coins", "pencils", "marbles", "stamps", "cards", "eggs", "shells", "stickers",
          "cookies", "bottles", "boxes", "tickets", "flowers")


def _problem(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(12)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if kind == 0:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"What is {a} + {b}?", str(a + b)
    if kind == 1:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"What is {a} - {b}?", str(a - b)
    if kind == 2:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} * {b}?", str(a * b)
    if kind == 3:
        b, q = rng.randint(1, 30), rng.randint(0, 50)
        return f"What is {b * q} / {b}?", str(q)
    if kind == 4:
        a, b, c = rng.randint(0, 99), rng.randint(0, 20), rng.randint(0, 20)
        return f"What is {a} + {b} * {c}?", str(a + b * c)
    if kind == 5:
        a, b, c = rng.randint(0, 50), rng.randint(0, 50), rng.randint(0, 20)
        return f"What is ({a} + {b}) * {c}?", str((a + b) * c)
    if kind == 6:
        a, b = rng.randint(1, 200), rng.randint(1, 200)
        return (f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?", str(a + b))
    if kind == 7:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return f"A box holds {a} {item}. How many {item} are in {b} boxes?", str(a * b)
    if kind == 8:
        b = rng.randint(1, 150)
        a = b + rng.randint(0, 150)
        return f"{name} had {a} {item} and gave away {b}. How many {item} are left?", str(a - b)
    if kind == 9:
        b, q = rng.randint(2, 12), rng.randint(1, 40)
        return (f"{b * q} {item} are shared equally among {b} friends. How many {item} does each friend get?",
                str(q))
    if kind == 10:
        a, b = rng.randint(0, 999), rng.randint(2, 30)
        return f"What is the remainder when {a} is divided by {b}?", str(a % b)
    p = rng.choice((10, 20, 25, 50, 75))
    x = 20 * rng.randint(1, 50)
    return f"What is {p}% of {x}?", str(p * x // 100)


def math_problems(n: int, split: str = "train", seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct generated problems ``(question, answer)`` of ``split``; the answer is an exact integer string.

    Deterministic in (n, split, seed); no two splits share a question (split = hash of the question).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    check_split(split)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    i = 0
    max_tries = 50 * n + 1000  # the question space is ~10^7; this only trips for absurd n
    while len(out) < n:
        if i >= max_tries:
            raise ValueError(f"n={n} is more distinct {split} math problems than the generator can produce")
        q, a = _problem(random.Random(stable_hash("math", seed, i)))
        i += 1
        if q in seen or split_of(q) != split:
            continue
        seen.add(q)
        out.append((q, a))
    return out


def format_math(question: str, answer: str | None = None) -> str:
    """Training/eval text of a math problem.

    ``format_math(q)`` is the prompt (``"Question: q\\nAnswer:"``, no trailing space so the answer tokenizes the
    same way in training and generation); ``format_math(q, a)`` is the prompt followed by ``" a\\n"``. The answer
    is the model's continuation up to the first newline, stripped (see :func:`extract_answer`).
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    prompt = f"Question: {question.strip()}\nAnswer:"
    if answer is None:
        return prompt
    return f"{prompt} {str(answer).strip()}\n"


def extract_answer(continuation: str) -> str:
    """The answer in a generated continuation of ``format_math(q)``: text up to the first newline, stripped."""
    return continuation.split("\n", 1)[0].strip()
