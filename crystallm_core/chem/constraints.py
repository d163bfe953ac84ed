"""Constrained decoding: a per-sample CIF state machine under which every finished CIF is
formula- and multiplicity-consistent, parses, and states a space group its cell can have.

The model's choices stay the model's. The decoder only
- writes what earlier tokens determine (jump-forward): the atom-type loop, the space-group
  number, both formula fields, Z, the volume, the identity symmetry loop, site labels and
  occupancies, and cell parameters that the crystal system fixes (b = a, 90°, 120°);
- masks choices that cannot lead to a valid CIF: space groups whose Wyckoff multiplicities
  cannot add up to the counts, cell lengths shorter than an atom's distance to its own image
  may be, elements with no atoms left, multiplicities that overshoot or leave a remainder no
  position can hold, malformed numbers;
- rewinds a site row whose orbit disagrees with its multiplicity or puts atoms closer than
  the bond check allows (`validity.shortest_allowed_distance`, so the two cannot disagree)
  and lets the model write that row again; after `row_retries` it backs up to the cell,
  after `cell_retries` it restarts the sample, after `restarts` it gives up.

The CIF grammar is written once, as a generator (`CifProgram.run`) that yields what it needs
next: `Force(token)` or `Choose(allowed tokens)`, and receives the token. `CifConstraint`
drives it for the sampler. Its state is a pure function of the tokens so far (plus retry
counters), so a rewind simply replays the kept tokens into a fresh program.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Generator, Iterable

import numpy as np
from pymatgen.core import Composition, Element, Lattice

from crystallm_core.chem.cif_format import (
    ATOM_TYPE_TAGS,
    atom_type_rows,
    repair_generated_cif,
)
from crystallm_core.chem.isolation import check_cif_isolated
from crystallm_core.chem.placement import (
    Placement,
    Problem,
    bond_judgeable,
    cell_problem,
    distance_bounds,
)
from crystallm_core.chem.validity import ValidityConfig
from crystallm_core.chem.wyckoff import (
    fillable,
    fixed_multiplicities,
    number_of,
    space_group,
)
from crystallm_core.lm.sampler import ConstraintStep
from crystallm_core.lm.tokenizer import ELEMENTS, CIFTokenizer

ATOM_SITE_TAGS = ["_atom_site_type_symbol", "_atom_site_label", "_atom_site_symmetry_multiplicity",
                  "_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z", "_atom_site_occupancy"]
DIGITS = "0123456789"
DECIMALS = 4
MAX_CELL_ATOMS = 208  # the most atoms in a conventional cell of the training data
PACKING_LIMIT = math.pi / (3 * math.sqrt(2))  # densest packing of equal spheres (Kepler)


@dataclass(frozen=True)
class ConstraintConfig:
    max_atoms: int = MAX_CELL_ATOMS
    row_retries: int = 8  # rewrites of one site row before backing up to the cell
    cell_retries: int = 3  # rewrites of the cell before restarting the sample
    restarts: int = 2  # restarts before giving up on the sample
    final_check: bool = True  # run every validity check when the last site is written; rewind the cell if one fails
    validity: ValidityConfig = field(default_factory=ValidityConfig)


# ---- requests the program yields -------------------------------------------------------------
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


class PromptMismatch(ValueError):
    """The prompt holds a token the CIF grammar would not allow there."""


@dataclass
class Retries:
    """Rewinds of one sample, kept across replays."""

    row: int = 0
    cell: int = 0
    restart: int = 0
    per_row: dict[int, int] = field(default_factory=dict)  # rewrites of each row of this cell
    cells_this_attempt: int = 0  # cell rewrites since the last restart
    reasons: dict[str, int] = field(default_factory=dict)

    def total(self) -> int:
        return self.row + self.cell + self.restart

    def to_dict(self) -> dict:
        return {"row": self.row, "cell": self.cell, "restart": self.restart, "reasons": dict(self.reasons)}


# ---- token sets, shared by every sample of a tokenizer ---------------------------------------
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


# ---- the grammar ----------------------------------------------------------------------------
Program = Generator["Force | Choose | Rewind | GiveUp", int, None]


class CifProgram:
    """The CIF grammar of the training format, as one generator (see the module docstring)."""

    def __init__(self, tokens: CifTokens, config: ConstraintConfig, retries: Retries, history: list[int]):
        self.t, self.config, self.retries = tokens, config, retries
        self.history = history  # every token so far (the constraint's list, read by the final check)
        self.final_report = None
        self.count = 0  # tokens consumed so far
        self.cell_start = self.sample_start = 0

    # helpers: each is a sub-generator; `yield from` returns what was written
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

    def coordinate(self, feasible: np.ndarray | None = None) -> Program:
        """A fractional coordinate '0.dddd' ('-0.0000' too, as CifWriter sometimes prints).

        feasible: per 1/len(feasible) step, whether the value may be written; digits whose whole
        range (with its end point) holds no feasible value are masked."""
        starts = self.t.ids("0", "-") if feasible is None or feasible[0] else self.t.ids("0")
        first = yield from self.choose(starts)
        if first == self.t.id["-"]:
            yield from self.expect("0.0000")
            return 0.0
        yield from self.expect(".")
        digits = ""
        for position in range(DECIMALS):
            allowed = self.t.digit.values() if feasible is None else \
                [self.t.digit[d] for d in DIGITS if window_feasible(feasible, digits + d)]
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

    # the CIF
    def run(self) -> Program:
        yield from self.expect("<bos>\ndata_[")
        self.sample_start = self.count
        counts = yield from self.formula()
        composition = Composition(counts)
        yield from self.expect("\n" + "\n".join(["loop_", *(" " + tag for tag in ATOM_TYPE_TAGS), "[",
                                                 *atom_type_rows(composition), "]"])
                               + "\n_symmetry_space_group_name_H-M [")
        group = space_group(number_of(self.t.space_group_of[(yield from self.choose(self.space_groups(counts)))]))
        yield from self.expect("]\n_cell_length_a [")
        bounds = distance_bounds(counts, self.config.validity)
        self.cell_start = self.count
        lattice = yield from self.cell(group, bounds)
        problem = cell_problem(lattice, counts, bounds, self.config.validity)
        if problem:
            yield from self.fail("cell", problem)
            return
        formula_sum = composition.formula
        reduced, z = composition.get_reduced_formula_and_factor()
        yield from self.expect(
            f"]\n_symmetry_Int_Tables_number [{group.number}]\n_chemical_formula_structural [{reduced}]\n"
            f"_chemical_formula_sum '[{formula_sum}]'\n_cell_volume [{lattice.volume:.{DECIMALS}f}]\n"
            f"_cell_formula_units_Z [{int(z)}]\nloop_\n _symmetry_equiv_pos_site_id\n"
            f" _symmetry_equiv_pos_as_xyz\n 1 'x, y, z'\nloop_\n"
            + "".join(f" {tag}\n" for tag in ATOM_SITE_TAGS) + "[\n")
        yield from self.sites(Placement(group, lattice, bounds), dict(counts))
        if self.config.final_check:
            problem = self.final_problem()
            if problem:
                yield from self.fail("final", problem)
                return
        yield from self.expect("]\n<eos>")

    def formula(self) -> Program:
        """`data_[` formula `]`: distinct writable elements with counts, at most max_atoms in all,
        and no two elements whose bond the check cannot judge."""
        counts: dict[str, int] = {}
        token = yield from self.choose(self.next_elements(counts))
        while token != self.t.id["]"]:
            element = self.t.element_of[token]
            left = self.config.max_atoms - sum(counts.values())
            number = ""
            while True:
                digits = {self.t.digit[d] for d in DIGITS if (number or d != "0") and int(number + d) <= left}
                ends = self.next_elements({**counts, element: int(number)}) | {self.t.id["]"]} if number else set()
                token = yield from self.choose(digits | ends)
                if token not in self.t.digit_of:
                    break
                number += self.t.digit_of[token]
            counts[element] = int(number)
        return counts

    def next_elements(self, counts: dict[str, int]) -> set[int]:
        if sum(counts.values()) >= self.config.max_atoms:
            return set()
        return {token for element, token in self.t.element.items()
                if element not in counts and all(bond_judgeable(element, other) for other in [element, *counts])}

    def space_groups(self, counts: dict[str, int]) -> set[int]:
        allowed = allowed_space_groups(tuple(sorted(counts.values(), reverse=True)), self.t.space_group_items)
        if not allowed:
            raise RuntimeError(f"no space group can hold {counts}")  # P1 always can
        return allowed

    def cell(self, group, bounds) -> Program:
        """a, b, c, α, β, γ as the crystal system allows; returns the Lattice."""
        system = group.crystal_system
        low, high = self.config.validity.length_range
        low = max(low, max(bounds.values()))  # an atom's own image is a cell length away
        angle_low, angle_high = self.config.validity.angle_range
        a = (yield from self.number(low, high))[1]
        yield from self.expect("]\n_cell_length_b [")
        b = (yield from self.fixed_number(a)) if system in ("tetragonal", "trigonal", "hexagonal", "cubic") \
            else (yield from self.number(low, high))[1]
        yield from self.expect("]\n_cell_length_c [")
        c = (yield from self.fixed_number(a)) if system == "cubic" else (yield from self.number(low, high))[1]
        yield from self.expect("]\n_cell_angle_alpha [")
        if system == "triclinic":
            alpha = (yield from self.number(angle_low, angle_high))[1]
            yield from self.expect("]\n_cell_angle_beta [")
            beta = (yield from self.number(angle_low, angle_high))[1]
            yield from self.expect("]\n_cell_angle_gamma [")
            # a cell exists only if every angle is below the sum of the other two and the sum is below 360°
            # (never empty for α, β within 10–170°)
            gamma_low = max(angle_low, abs(alpha - beta) + 1.0)
            gamma_high = min(angle_high, alpha + beta - 1.0, 359.0 - alpha - beta)
            gamma = (yield from self.number(gamma_low, gamma_high))[1]
        else:
            alpha = yield from self.fixed_number(90.0)
            yield from self.expect("]\n_cell_angle_beta [")
            beta = (yield from self.number(angle_low, angle_high))[1] if system == "monoclinic" \
                else (yield from self.fixed_number(90.0))
            yield from self.expect("]\n_cell_angle_gamma [")
            gamma = yield from self.fixed_number(120.0 if system in ("trigonal", "hexagonal") else 90.0)
        return Lattice.from_parameters(a, b, c, alpha, beta, gamma)

    def sites(self, placement: Placement, remaining: dict[str, int]) -> Program:
        row = 0
        while any(remaining.values()):
            yield from self.expect(" ")
            row_start = self.count
            element = self.t.element_of[(yield from self.choose(
                self.t.element[e] for e, n in remaining.items() if n > 0))]
            yield from self.expect(f" {element}{row} ")
            options = placement.multiplicities(element, remaining)
            multiplicity = int((yield from self.choose_text({str(m) for m in options}, " ")))
            x = yield from self.coordinate()
            yield from self.expect(" ")
            y = yield from self.coordinate()
            yield from self.expect(" ")
            feasible = placement.feasible_last(element, multiplicity, x, y)
            if feasible.any():
                z = yield from self.coordinate(feasible)
                problem, fixed = placement.problem(element, multiplicity, np.array([x, y, z]), remaining)
            else:
                problem = Problem("blocked", f"no z completes ({x:.4f}, {y:.4f}) into a row of "
                                             f"multiplicity {multiplicity}")
            if problem:
                yield from self.fail("row", problem, row_start, row)
                return
            placement.add(element, np.array([x, y, z]), fixed)
            remaining[element] -= multiplicity
            yield from self.expect(" 1\n")
            row += 1

    def final_problem(self) -> Problem | None:
        """Every validity check on the finished CIF (in the isolated checker): bond lengths that are
        too long can only be judged once every atom is placed."""
        text = self.t.tokenizer.decode(self.history, skip_special_tokens=False) + "]\n<eos>"
        repaired = repair_generated_cif(text)
        report = check_cif_isolated(repaired.cif) if repaired.cif else None
        self.final_report = report
        if report is not None and report.valid:
            return None
        failed = report.failed_reasons if report is not None else [repaired.reason]
        kind = "bonds" if report is not None and [c.name for c in report.checks if not c.passed] == ["bond_lengths"] \
            else "checks"
        return Problem(kind, "; ".join(failed))

    def fail(self, level: str, problem: Problem, row_start: int = 0, row: int = 0) -> Program:
        """Rewind a row, the cell, or the sample, escalating as retries run out; or give up."""
        retries, config = self.retries, self.config
        retries.reasons[problem.kind] = retries.reasons.get(problem.kind, 0) + 1
        if level == "row":
            retries.per_row[row] = retries.per_row.get(row, 0) + 1
            if retries.per_row[row] <= config.row_retries:
                retries.row += 1
                yield Rewind(row_start, "row", problem.text)
                return
        retries.per_row.clear()
        retries.cell += 1
        retries.cells_this_attempt += 1
        if retries.cells_this_attempt <= config.cell_retries:
            yield Rewind(self.cell_start, "cell", problem.text)
            return
        retries.cells_this_attempt = 0
        retries.restart += 1
        if retries.restart <= config.restarts:
            yield Rewind(self.sample_start, "restart", problem.text)
            return
        yield GiveUp(f"gave up after {retries.total()} rewinds (last: {problem.text})")


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


@functools.lru_cache(maxsize=4096)
def allowed_space_groups(counts: tuple[int, ...], vocabulary: frozenset[tuple[str, int]]) -> frozenset[int]:
    """Token ids of the vocabulary's space groups whose positions can hold these counts."""
    return frozenset(token for symbol, token in vocabulary
                     if fillable(number_of(symbol), counts, fixed_multiplicities(number_of(symbol))))


# ---- the sampler's view ---------------------------------------------------------------------
class CifConstraint:
    """Drives a `CifProgram` for one sample: the sampler's `DecodingConstraint`."""

    def __init__(self, tokens: CifTokens, config: ConstraintConfig = ConstraintConfig()):
        self.t, self.config = tokens, config
        self.retries = Retries()
        self.history: list[int] = []
        self.prompt_length = 0
        self.program: Program | None = None
        self.request = None

    def restart_program(self) -> None:
        self.program = CifProgram(self.t, self.config, self.retries, self.history).run()
        self.request = next(self.program)

    def start(self, prompt_ids: list[int]) -> ConstraintStep:
        """Feed the prompt; returns the tokens forced after it. PromptMismatch if it breaks the grammar."""
        self.history.clear()
        self.prompt_length = len(prompt_ids)
        self.restart_program()
        for token in prompt_ids:
            if not self.accepts(token):
                raise PromptMismatch(f"the prompt's token {self.t.tokenizer.vocab[token]!r} is not allowed "
                                     f"at position {len(self.history)} by constrained decoding")
            step = self.send(token)
            if step.rewind_to is not None or step.gave_up:
                raise PromptMismatch("the prompt cannot be completed into a valid CIF")
        return self.follow()

    def retry_counts(self) -> dict:
        return self.retries.to_dict()

    def accepts(self, token: int) -> bool:
        request = self.request
        return (isinstance(request, Force) and request.token == token) or \
            (isinstance(request, Choose) and token in request.allowed)

    def allowed(self) -> frozenset[int]:
        """Tokens the model may choose now."""
        return self.request.allowed if isinstance(self.request, Choose) else frozenset([self.request.token])

    def send(self, token: int) -> ConstraintStep:
        self.history.append(token)
        try:
            self.request = self.program.send(token)
        except StopIteration:
            self.request = None
            return ConstraintStep(finished=True)
        if isinstance(self.request, Rewind):
            keep = max(self.request.keep, self.prompt_length)  # a prompt is never taken back
            self.replay(self.history[:keep])
            return ConstraintStep(forced=self.follow().forced, rewind_to=keep)
        if isinstance(self.request, GiveUp):
            return ConstraintStep(gave_up=self.request.reason)
        return ConstraintStep()

    def replay(self, tokens: list[int]) -> None:
        self.history.clear()
        self.restart_program()
        for token in tokens:
            self.history.append(token)
            self.request = self.program.send(token)

    def advance(self, token: int) -> ConstraintStep:
        """The model chose `token`: returns the forced continuation, a rewind or the end."""
        if not self.accepts(token):
            raise ValueError(f"token {token} was not allowed here")
        step = self.send(token)
        if step.rewind_to is not None or step.finished or step.gave_up:
            return step
        return self.follow()

    def follow(self) -> ConstraintStep:
        """Write every forced token from here to the next choice."""
        forced = []
        while isinstance(self.request, Force):
            token = self.request.token
            forced.append(token)
            step = self.send(token)
            if step.finished:
                return ConstraintStep(forced=forced, finished=True)
            if step.rewind_to is not None or step.gave_up:  # a forced token completed a failing check
                return step
        return ConstraintStep(forced=forced)
