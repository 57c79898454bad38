"""Call counters of the ops' forward and backward passes.

Scripts and tests read them to prove that work really went through an op (e.g. that fine-tuning ran
poly's custom backward and did not silently fall back to another path): `COUNTS["poly.backward"]`.
"""

from collections import Counter

COUNTS: Counter = Counter()


def count(name: str) -> None:
    COUNTS[name] += 1


def reset() -> None:
    COUNTS.clear()
