"""Token-level building blocks of a constrained decoding grammar.

A grammar is a generator that yields what it needs next, `Force(token)` or `Choose(allowed
tokens)`, receives the token written, and may yield `Rewind`, `GiveUp` or `Check` (a slow
judgement its driver may run in the background, sending back the outcome). `TokenGrammar` holds
the pieces every field is made of: fixed text, a choice, a decimal number within bounds, a
fractional coordinate (optionally restricted to feasible values), one of a few digit strings.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Generator, Iterable

import numpy as np
from pymatgen.core import Element

from crystallm_core.lm.tokenizer import ELEMENTS, CIFTokenizer

DIGITS = "0123456789"
DECIMALS = 4


@dataclass(frozen=True)
class Force:
    token: int


@dataclass(frozen=True)
class Choose:
    allowed: frozenset[int]


@dataclass(frozen=True)
class Rewind:
    keep: int  # tokens to keep (the prompt included)
    level: str  # "row" | "cell" | "restart"
    reason: str


@dataclass(frozen=True)
class GiveUp:
    reason: str


@dataclass(frozen=True)
class Check:
    """Judge this finished text; the program is sent the outcome (`cif_program.final_problem`)."""

    text: str


Program = Generator["Force | Choose | Rewind | GiveUp | Check", "int | object", None]


class CifTokens:
    """Token ids and text → ids, with the sets the grammar chooses from."""

    def __init__(self, tokenizer: CIFTokenizer, allowed_elements: Iterable[str] | None = None):
        self.tokenizer = tokenizer
        self.id = tokenizer.token_to_id
        self.digit = {d: self.id[d] for d in DIGITS}
        self.digit_of = {i: d for d, i in self.digit.items()}
        writable = [e for e in ELEMENTS if Element(e).atomic_radius is not None]  # else no bond can pass
        if allowed_elements is not None:
            allowed_elements = set(allowed_elements)
            writable = [e for e in writable if e in allowed_elements]
        self.element = {e: self.id[e] for e in writable}
        self.element_of = {i: e for e, i in self.element.items()}
        self.space_group = {t[:-3]: i for t, i in self.id.items() if t.endswith("_sg")}
        self.space_group_of = {i: s for s, i in self.space_group.items()}
        self.space_group_items = frozenset(self.space_group.items())

    @functools.lru_cache(maxsize=4096)
    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text))

    def ids(self, *tokens: str) -> frozenset[int]:
        return frozenset(self.id[t] for t in tokens)


class TokenGrammar:
    """Counts the tokens consumed; each helper is a sub-generator: `yield from` returns what was written."""

    def __init__(self, tokens: CifTokens):
        self.t = tokens
        self.count = 0  # tokens consumed so far

    def token(self, request: Force | Choose) -> Program:
        received = yield request
        self.count += 1
        return received

    def expect(self, text: str) -> Program:
        for token in self.t.encode(text):
            yield from self.token(Force(token))

    def choose(self, allowed: Iterable[int]) -> Program:
        return (yield from self.token(Choose(frozenset(allowed))))

    def number(self, low: float, high: float, max_int_digits: int = 3) -> Program:
        """A decimal with exactly DECIMALS decimals, value within [low, high]; returns (text, value)."""
        text = ""
        while True:
            decimals = len(text.split(".")[1]) if "." in text else None
            if decimals == DECIMALS:
                return text, float(text)
            options = [c for c in DIGITS + "." if number_prefix_feasible(text + c, low, high, max_int_digits)]
            if not options:
                raise RuntimeError(f"no number in [{low}, {high}] starts with '{text}'")
            token = yield from self.choose(self.t.digit[c] if c != "." else self.t.id["."] for c in options)
            text += self.t.digit_of.get(token, ".")

    def fixed_number(self, value: float) -> Program:
        yield from self.expect(f"{value:.{DECIMALS}f}")
        return value

    def coordinate(self, feasible: np.ndarray | None = None, banned: Iterable[str] = ()) -> Program:
        """A fractional coordinate '0.dddd' ('-0.0000' too, as CifWriter sometimes prints).

        feasible: per 1/len(feasible) step, whether the value may be written; digits whose whole
        range (with its end point) holds no feasible value are masked. banned: digit strings
        ('5000' for 0.5) that may not be written (fewer than ten per prefix, so never all)."""
        banned = set(banned)
        zero_ok = (feasible is None or feasible[0]) and "0" * DECIMALS not in banned
        starts = self.t.ids("0", "-") if zero_ok else self.t.ids("0")
        first = yield from self.choose(starts)
        if first == self.t.id["-"]:
            yield from self.expect("0.0000")
            return 0.0
        yield from self.expect(".")
        digits = ""
        for position in range(DECIMALS):
            allowed = [self.t.digit[d] for d in DIGITS
                       if (feasible is None or window_feasible(feasible, digits + d))
                       and (position < DECIMALS - 1 or digits + d not in banned)]
            digits += self.t.digit_of[(yield from self.choose(allowed))]
        return float("0." + digits)

    def choose_text(self, options: set[str], terminator: str) -> Program:
        """One of `options` (digit strings), digit by digit, ended by the terminator token."""
        text = ""
        while True:
            allowed = {self.t.digit[o[len(text)]] for o in options if o.startswith(text) and len(o) > len(text)}
            if text in options:
                allowed.add(self.t.id[terminator])
            token = yield from self.choose(allowed)
            if token == self.t.id[terminator]:
                return text
            text += self.t.digit_of[token]


def window_feasible(feasible: np.ndarray, digits: str) -> bool:
    """Does the range of values starting '0.<digits>' (its end point included) hold a feasible
    grid value? Digits beyond the grid's resolution are always allowed."""
    steps = len(feasible)
    scale = steps // 10 ** len(digits)
    if scale < 1:
        return True
    start = int(digits) * scale
    return bool(feasible[start:start + scale + 1].any() or (start + scale == steps and feasible[0]))


def number_prefix_feasible(text: str, low: float, high: float, max_int_digits: int) -> bool:
    """Can `text` (digits and at most one '.') grow into a DECIMALS-decimal number in [low, high]?"""
    if text.count(".") > 1 or text.startswith("."):
        return False
    whole, _, decimals = text.partition(".")
    if len(whole) > max_int_digits or (len(whole) > 1 and whole[0] == "0") or len(decimals) > DECIMALS:
        return False
    if "." in text:
        start = float(text if decimals else whole)
        span = 10.0 ** -len(decimals) - 10.0 ** -DECIMALS
        return start <= high and start + span >= low
    value = int(whole)
    if value == 0:
        return low < 1.0
    for extra in range(0, max_int_digits - len(whole) + 1):
        start, end = value * 10 ** extra, (value + 1) * 10 ** extra - 10.0 ** -DECIMALS
        if start <= high and end >= low:
            return True
    return False
