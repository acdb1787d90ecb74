"""`Problem` and `InvalidSpec`: what is wrong with an InferenceService spec, field by field.

Their own module so that the spec's parts (spec.py, traffic.py, the schema check) report problems
the same way without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: where, what it was, what would be accepted."""

    field: str
    value: Any
    allowed: str

    def __str__(self) -> str:
        if self.value is None:
            return f"{self.field}: {self.allowed}"
        return f"{self.field}: got {self.value!r}; {self.allowed}"


class InvalidSpec(ValueError):
    """The spec cannot work as written. Retrying will not help; the user must edit it."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))
