"""The CIF grammar of the training format under constraints (see `constraints` for what it
guarantees): formula, atom-type loop, space group, cell, site rows, the final check, and the
rewinds when a row, the cell or the sample cannot stand."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from pymatgen.core import Composition, Lattice

from crystallm_core.chem.cif.cif_format import (
    ATOM_TYPE_TAGS,
    atom_type_rows,
    repair_generated_cif,
)
from crystallm_core.chem.decoding.grammar import (
    DECIMALS,
    DIGITS,
    Check,
    CifTokens,
    GiveUp,
    Program,
    Rewind,
    TokenGrammar,
)
from crystallm_core.chem.judges.isolation import check_cif_isolated
from crystallm_core.chem.decoding.placement import (
    Placement,
    Problem,
    bond_judgeable,
    cell_problem,
    distance_bounds,
)
from crystallm_core.chem.judges.validity import ValidityConfig
from crystallm_core.chem.cif.wyckoff import (
    fillable,
    fixed_multiplicities,
    number_of,
    space_group,
)

ATOM_SITE_TAGS = ["_atom_site_type_symbol", "_atom_site_label", "_atom_site_symmetry_multiplicity",
                  "_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z", "_atom_site_occupancy"]
MAX_CELL_ATOMS = 208  # the most atoms in a conventional cell of the training data
Y_RETRIES = 2  # y values tried on one x before a blocked row is written again from its element


@dataclass(frozen=True)
class ConstraintConfig:
    max_atoms: int = MAX_CELL_ATOMS
    # Budgets measured on the shipped model (4 × 64 samples, scripts/measure_validity.py): a row
    # that fails four times is usually in a cell too crowded for what is left, and every further
    # attempt costs all slots a step; (8, 3, 2) cost 32 % more wall time, with more gave-ups.
    row_retries: int = 4  # rewrites of one site row before backing up to the cell
    cell_retries: int = 1  # rewrites of the cell before restarting the sample
    restarts: int = 1  # restarts before giving up on the sample
    final_check: bool = True  # run every validity check when the last site is written; rewind the cell if one fails
    validity: ValidityConfig = field(default_factory=ValidityConfig)


@dataclass
class Retries:
    """Rewinds of one sample, kept across replays."""

    row: int = 0
    cell: int = 0
    restart: int = 0
    per_row: dict[int, int] = field(default_factory=dict)  # rewrites of each row of this cell
    blocked_y: dict[tuple[int, float], set[str]] = field(default_factory=dict)  # (row, x) -> y digits no z completes
    cells_this_attempt: int = 0  # cell rewrites since the last restart
    reasons: dict[str, int] = field(default_factory=dict)

    def total(self) -> int:
        return self.row + self.cell + self.restart

    def to_dict(self) -> dict:
        return {"row": self.row, "cell": self.cell, "restart": self.restart, "reasons": dict(self.reasons)}


class CifProgram(TokenGrammar):
    """The CIF, as one generator (`run`); its state is a pure function of the tokens it was sent."""

    def __init__(self, tokens: CifTokens, config: ConstraintConfig, retries: Retries, history: list[int]):
        super().__init__(tokens)
        self.config, self.retries = config, retries
        self.history = history  # every token so far (the constraint's list, read by the final check)
        self.final_report = None
        self.cell_start = self.sample_start = 0

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
            text = self.t.tokenizer.decode(self.history, skip_special_tokens=False) + "]\n<eos>"
            self.final_report, problem = yield Check(text)  # final_problem(text), maybe in the background
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
            y_start = self.count
            y = yield from self.coordinate(banned=self.retries.blocked_y.get((row, x), ()))
            yield from self.expect(" ")
            feasible = placement.feasible_last(element, multiplicity, x, y)
            if feasible.any():
                z = yield from self.coordinate(feasible)
                problem, fixed = placement.problem(element, multiplicity, np.array([x, y, z]), remaining)
            else:
                problem = Problem("blocked", f"no z completes ({x:.4f}, {y:.4f}) into a row of "
                                             f"multiplicity {multiplicity}")
                # Only y is written again (with this y masked) until Y_RETRIES values failed on
                # this x: a blocked row costs 5 tokens instead of 13. Then x may be what blocks.
                blocked_y = self.retries.blocked_y.setdefault((row, x), set())
                blocked_y.add(f"{y:.{DECIMALS}f}"[2:])
                if len(blocked_y) < Y_RETRIES:
                    row_start = y_start
            if problem:
                yield from self.fail("row", problem, row_start, row)
                return
            placement.add(element, np.array([x, y, z]), fixed)
            remaining[element] -= multiplicity
            yield from self.expect(" 1\n")
            row += 1

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
        retries.blocked_y.clear()
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


def final_problem(text: str) -> tuple[object, Problem | None]:
    """(report, why the finished text fails) from every validity check, in the isolated checker:
    bond lengths that are too long can only be judged once every atom is placed."""
    repaired = repair_generated_cif(text)
    report = check_cif_isolated(repaired.cif) if repaired.cif else None
    if report is not None and report.valid:
        return report, None
    failed = report.failed_reasons if report is not None else [repaired.reason]
    kind = "bonds" if report is not None and [c.name for c in report.checks if not c.passed] == ["bond_lengths"] \
        else "checks"
    return report, Problem(kind, "; ".join(failed))


@functools.lru_cache(maxsize=4096)
def allowed_space_groups(counts: tuple[int, ...], vocabulary: frozenset[tuple[str, int]]) -> frozenset[int]:
    """Token ids of the vocabulary's space groups whose positions can hold these counts."""
    return frozenset(token for symbol, token in vocabulary
                     if fillable(number_of(symbol), counts, fixed_multiplicities(number_of(symbol))))
