"""A tiny evaluator for the instant PromQL the dashboard and KEDA use, over scraped /metrics pages.

Enough to check that an aggregation gives the true number when several processes export a series:
selectors with `=` matchers, `sum|max|min|avg|count [by (labels)] (expr)`, `a + b` (matched on equal
label sets), `a or b`, `vector(N)`, parentheses. Range functions (rate, histogram_quantile) are out of
scope: `instant(expr)` says whether an expression is one this module evaluates.
"""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[dict, float]
TOKEN = re.compile(r'\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_:]*)|(?P<str>"[^"]*")|(?P<op>[(){},=+]))')
AGGREGATIONS = {"sum": sum, "max": max, "min": min, "avg": lambda v: sum(v) / len(v), "count": len}


def samples_of(pages: dict[str, str]) -> list[tuple[str, dict, float]]:
    """Every sample of several scraped pages, each labelled with its page's `instance` (as Prometheus does)."""
    out = []
    for instance, text in pages.items():
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.append((sample.name, {**sample.labels, "instance": instance}, sample.value))
    return out


def instant(expr: str) -> bool:
    return "[" not in expr and "histogram_quantile" not in expr


def evaluate(expr: str, samples: list[tuple[str, dict, float]]) -> list[Sample]:
    tokens = [(kind, value) for match in TOKEN.finditer(expr.strip()) for kind, value in match.groupdict().items()
              if value is not None]
    if "".join(v for _, v in tokens).replace(" ", "") != expr.replace(" ", ""):
        raise ValueError(f"cannot tokenize {expr!r}")
    parser = _Parser(tokens, samples)
    result = parser.expr()
    if parser.position != len(tokens):
        raise ValueError(f"trailing input in {expr!r}")
    return result


class _Parser:
    def __init__(self, tokens, samples):
        self.tokens, self.samples, self.position = tokens, samples, 0

    def peek(self):
        return self.tokens[self.position][1] if self.position < len(self.tokens) else None

    def take(self, expected=None):
        value = self.peek()
        if expected is not None and value != expected:
            raise ValueError(f"expected {expected!r}, got {value!r}")
        self.position += 1
        return value

    def expr(self) -> list[Sample]:
        left = self.union()
        while self.peek() == "+":
            self.take()
            right = {_key(labels): value for labels, value in self.union()}
            left = [(labels, value + right[_key(labels)]) for labels, value in left if _key(labels) in right]
        return left

    def union(self) -> list[Sample]:
        left = self.primary()
        while self.peek() == "or":
            self.take()
            seen = {_key(labels) for labels, _ in left}
            left = left + [(labels, value) for labels, value in self.primary() if _key(labels) not in seen]
        return left

    def primary(self) -> list[Sample]:
        token = self.take()
        if token == "(":
            inner = self.expr()
            self.take(")")
            return inner
        if token in AGGREGATIONS:
            by = []
            if self.peek() == "by":
                self.take()
                by = self.labels()
            self.take("(")
            inner = self.expr()
            self.take(")")
            if self.peek() == "by":
                self.take()
                by = self.labels()
            groups: dict[tuple, list[float]] = {}
            for labels, value in inner:
                groups.setdefault(tuple((name, labels.get(name, "")) for name in by), []).append(value)
            return [(dict(key), AGGREGATIONS[token](values)) for key, values in groups.items()]
        if token == "vector":
            self.take("(")
            number = float(self.take())
            self.take(")")
            return [({}, number)]
        matchers = {}
        if self.peek() == "{":
            self.take()
            while self.peek() != "}":
                name = self.take()
                self.take("=")
                matchers[name] = self.take().strip('"')
                if self.peek() == ",":
                    self.take()
            self.take("}")
        return [(labels, value) for name, labels, value in self.samples
                if name == token and all(labels.get(k) == v for k, v in matchers.items())]

    def labels(self) -> list[str]:
        self.take("(")
        names = []
        while self.peek() != ")":
            names.append(self.take())
            if self.peek() == ",":
                self.take()
        self.take(")")
        return names


def _key(labels: dict) -> tuple:
    return tuple(sorted(labels.items()))
