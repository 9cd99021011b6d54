"""Alertmanager-style label matchers: `name="v"`, `name!="v"`, `name=~"re"`, `name!~"re"`.

As in Alertmanager, a regex matches the whole value (it is anchored), and a
label that is absent matches as the empty string.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

OPERATORS = ("=", "!=", "=~", "!~")

_SHAPE = re.compile(
    r"""^\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*
        (?P<op>[=!~<>]+)\s*
        (?P<value>"(?:[^"\\]|\\.)*"|[^"\s]*)\s*$""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Matcher:
    name: str
    op: str
    value: str
    pattern: re.Pattern[str] | None = None

    def matches(self, labels: dict[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        hit = self.pattern.fullmatch(actual) is not None
        return hit if self.op == "=~" else not hit

    def __str__(self) -> str:
        return f"{self.name}{self.op}{json.dumps(self.value)}"


@functools.lru_cache(maxsize=1024)
def parse_matcher(text: str) -> Matcher:
    """Parse one matcher; ValueError says what is wrong in words an operator can act on."""
    if not isinstance(text, str):
        raise ValueError(f"matcher must be a string like 'alertname=\"X\"', got {type(text).__name__}")
    found = _SHAPE.match(text)
    if not found:
        raise ValueError(f'cannot parse matcher {text!r}: expected name="value" with one of {", ".join(OPERATORS)}')
    name, op, value = found.group("name", "op", "value")
    if op not in OPERATORS:
        raise ValueError(f'unknown operator "{op}" in {text!r} (use one of {", ".join(OPERATORS)})')
    if value.startswith('"'):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise ValueError(f"bad quoted value in {text!r}: {err.msg}") from None
    pattern = None
    if op in ("=~", "!~"):
        try:
            pattern = re.compile(value)
        except re.error as err:
            raise ValueError(f"bad regular expression {value!r} in {text!r}: {err}") from None
    return Matcher(name, op, value, pattern)


def matches_all(matchers: tuple[Matcher, ...], labels: dict[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)
