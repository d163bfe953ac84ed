"""Is a generated CIF a plausible crystal? The CrystaLLM-pi validity checks (reference §4a-d
plus the generation-time sanity check), each with its own verdict and a reason a person can read.

check_cif never raises: a check that crashes fails with the exception text as its reason, and
checks that need the parsed structure fail with "skipped: CIF did not parse". Native code
(spglib, CrystalNN's neighbour search) only ever sees a structure that `structure_problem`
accepts: a cell that is finite, right-handed, not flat and inside the sane ranges (spglib
segfaults on e.g. a zero angle) whose atoms are not piled up (`crowding`). Checks that need such a cell are skipped with that reason.
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable

import numpy as np
from pymatgen.analysis.local_env import CrystalNN
from pymatgen.core import Composition, Element, Structure
from pymatgen.io.cif import CifParser
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from crystallm_core.chem.cif.cif_limits import cif_size_problem
from crystallm_core.chem.judges.check_limits import CheckTimeout, error_text, parse_error_text, time_limit
from crystallm_core.chem.judges.crowding import CrowdingLimits, crowding_problem


@dataclass(frozen=True)
class ValidityConfig:
    symprec: float = 0.1              # SpacegroupAnalyzer tolerance, as in CifWriter/training
    site_tolerance: float = 1e-3      # fractional distance under which CifParser merges sites
    composition_tol: float = 0.1      # rtol = atol for fractional compositions (§4a)
    bond_tolerance: float = 0.32      # a bond passes if 0.68 < d / expected < 1.32 (§4c)
    hydrogen_factor: float = 2.5      # bonds with H only need d / expected < 2.5
    ionic_x_difference: float = 1.7   # |ΔX| from which a bond counts as ionic
    length_range: tuple[float, float] = (0.5, 1000.0)   # Å
    angle_range: tuple[float, float] = (10.0, 170.0)    # degrees
    min_distance: float = 0.5         # Å between any two atoms
    min_volume_fraction: float = 0.02  # volume / (a·b·c): below this the cell is flat
    max_sites: int = 2000             # bigger cells are not handed to native code at all
    max_sites_for_bonds: int = 500    # CrystalNN cost grows fast; bigger cells are not checked
    # CrystalNN's search may widen to the cell diagonal: in a sparse, long cell that is one native
    # Voronoi call of minutes. Skipped when both: real MP-20 cells have ≤ 75 Å³ per atom.
    max_neighbour_search: int = 20_000  # sites around one atom (`neighbour_search_size`)
    sparse_volume_per_atom: float = 150.0  # Å³


CHECK_NAMES = ["parses", "formula_consistency", "multiplicity", "sane_cell", "space_group",
               "bond_lengths"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    reason: str


# How the space_group check judges a stated group against the one spglib detects.
SPACE_GROUP_RULES = {
    "exact": "the stated space group must be the detected one (the model's own text claims a group)",
    "subgroup": "the stated space group may be the detected one or any subgroup of it, P 1 included "
                "(a user's file, e.g. Materials Project's full cells in P 1)",
}


@dataclass
class ValidityReport:
    checks: list[CheckResult]
    structure: Structure | None = None
    formula: str | None = None       # reduced formula of the parsed structure, e.g. 'TiO2'
    spacegroup: str | None = None    # detected H-M symbol (symprec 0.1), else the stated one
    # What `judged_as_user_file` needs; not kept in the history (compare=False: a reopened run is equal)
    stated_spacegroup: str | None = field(default=None, compare=False)
    stated_is_subgroup: bool | None = field(default=None, compare=False)  # stated ≠ detected but a subgroup of it
    space_group_rule: str = "exact"  # a key of SPACE_GROUP_RULES

    @property
    def valid(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed_reasons(self) -> list[str]:
        return [f"{check.name}: {check.reason}" for check in self.checks if not check.passed]

    def check(self, name: str) -> CheckResult:
        return next(check for check in self.checks if check.name == name)

    def to_dict(self) -> dict:
        return {"valid": self.valid, "formula": self.formula, "spacegroup": self.spacegroup,
                "space_group_rule": self.space_group_rule,
                "checks": {c.name: {"passed": c.passed, "reason": c.reason} for c in self.checks}}


def judged_as_user_file(report: ValidityReport) -> ValidityReport:
    """The report under the "subgroup" rule: a researcher's file that states P 1 (or any subgroup of
    the detected group) describes its crystal correctly, so its space_group check passes and names
    the detected group as information. The model's own text keeps the "exact" rule."""
    checks = [CheckResult("space_group", True, f"{report.stated_spacegroup} as stated, a subgroup of the detected "
                                                f"{report.spacegroup} (user file: subgroups allowed)")
              if check.name == "space_group" and not check.passed and report.stated_is_subgroup else check
              for check in report.checks]
    return replace(report, checks=checks, space_group_rule="subgroup")


@lru_cache(maxsize=None)
def subgroup_numbers(number: int) -> frozenset[int]:
    """International numbers of every subgroup type of space group `number`, itself included
    (pymatgen's table of maximal subgroups, followed down; it has cycles, e.g. P4/mmm and I4/mmm)."""
    from pymatgen.symmetry.groups import SYMM_DATA

    found, frontier = {number}, [number]
    while frontier:
        for subgroup in SYMM_DATA["maximal_subgroups"][str(frontier.pop())]:
            if subgroup not in found:
                found.add(subgroup)
                frontier.append(subgroup)
    return frozenset(found)


def space_group_number(symbol: str) -> int | None:
    """The international number of an H-M symbol as CIFs write it ('P 1', 'P 1 21/c 1', 'Fm-3m')."""
    from pymatgen.symmetry.groups import SpaceGroup

    for candidate in (symbol, symbol.replace(" ", ""), re.sub(r"(\d)(\d)", r"\1_\2", symbol.replace(" ", ""))):
        try:
            return SpaceGroup(candidate).int_number
        except Exception:
            continue
    return None


def lattice_problem(lattice, config: ValidityConfig = ValidityConfig()) -> str | None:
    """Why a lattice must not reach native code (None if it is sane): non-finite numbers, a
    length or angle outside the sane ranges, a left-handed or flat cell."""
    matrix = np.asarray(lattice.matrix, dtype=float)
    if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
        return "the cell has non-finite numbers (impossible lengths or angles)"
    low, high = config.length_range
    for axis, length in zip("abc", lattice.abc):
        if not low <= length <= high:
            return f"cell length {axis} = {length:.4g} Å is outside {low:g}–{high:g} Å"
    low, high = config.angle_range
    for name, angle in zip(("alpha", "beta", "gamma"), lattice.angles):
        if not (math.isfinite(angle) and low <= angle <= high):
            return f"cell angle {name} = {angle:.4g}° is outside {low:g}–{high:g}°"
    volume = float(np.linalg.det(matrix))
    if volume <= 0:
        return "the cell is left-handed or flat (volume ≤ 0)"
    fraction = volume / float(np.prod(lattice.abc))
    if fraction < config.min_volume_fraction:
        return (f"the cell is nearly flat: its volume is {fraction:.1%} of a·b·c "
                f"(angles {', '.join(f'{x:.1f}' for x in lattice.angles)}°)")
    return None


def structure_problem(structure: Structure, config: ValidityConfig = ValidityConfig()) -> str | None:
    """Why a structure must not reach native or learned code (spglib, CrystalNN, CHGNet, the
    surrogates, the XRD pattern); None if it may. Cheap: the cell first, then bounded neighbour
    searches (`crowding.crowding_problem`: atoms closer than min_distance or too crowded)."""
    if structure is None or len(structure) == 0:
        return "no atoms"
    if len(structure) > config.max_sites:
        return f"{len(structure)} sites is more than the {config.max_sites} this tool analyses"
    problem = lattice_problem(structure.lattice, config)
    if problem:
        return problem
    if not np.all(np.isfinite(structure.frac_coords)):
        return "atom coordinates are not finite numbers"
    return crowding_problem(structure, CrowdingLimits(min_distance=config.min_distance))


def neighbour_search_size(structure: Structure) -> float:
    """About how many sites CrystalNN gathers around one atom when its Voronoi search widens to
    the longest cell diagonal, as it does in long thin cells (a 225 × 5.6 × 5.6 Å cell held one
    native Voronoi call for minutes, past any time limit)."""
    lattice = structure.lattice
    reach = max(float(np.linalg.norm(lattice.get_cartesian_coords(corner)))
                for corner in ([1, 1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, -1]))
    return len(structure) * (4 / 3 * math.pi * reach ** 3) / lattice.volume


class CheckFailed(Exception):
    """Raised inside a check to fail it with a readable reason."""


def as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def element_symbol(label: str) -> str:
    match = re.match(r"[A-Z][a-z]?", label.strip())
    if not match:
        raise CheckFailed(f"atom type '{label}' is not an element")
    return match.group()


def formula_of(composition: Composition) -> str:
    return composition.formula.replace(" ", "")


def expected_bond_length(a: Element, b: Element, config: ValidityConfig = ValidityConfig()) -> float:
    """Cation + anion radii for ionic bonds (|ΔX| >= 1.7), else the sum of atomic radii (§4c).
    Raises CheckFailed when the radii are unknown."""
    if abs(a.X - b.X) >= config.ionic_x_difference:
        cation, anion = (a, b) if a.X < b.X else (b, a)
        expected = float(cation.average_cationic_radius) + float(anion.average_anionic_radius)
    else:
        if a.atomic_radius is None or b.atomic_radius is None:
            missing = a if a.atomic_radius is None else b
            raise CheckFailed(f"no atomic radius known for {missing}")
        expected = float(a.atomic_radius) + float(b.atomic_radius)
    if not expected > 0:
        raise CheckFailed(f"no reference radii for a {a}–{b} bond")
    return expected


def shortest_allowed_distance(a: Element, b: Element, config: ValidityConfig = ValidityConfig()) -> float:
    """The closest two atoms may be and still pass the sane-cell and bond-length checks
    (bonds with H have no lower ratio). Raises CheckFailed when the radii are unknown."""
    if "H" in (a.symbol, b.symbol):
        return config.min_distance
    return max(config.min_distance, (1 - config.bond_tolerance) * expected_bond_length(a, b, config))



@dataclass(frozen=True)
class Bond:
    a: Element
    b: Element
    length: float  # Å
    expected: float  # Å, `expected_bond_length`

    @property
    def ratio(self) -> float:
        return self.length / self.expected

    @property
    def with_hydrogen(self) -> bool:
        return "H" in (self.a.symbol, self.b.symbol)

    def within(self, config: ValidityConfig = ValidityConfig()) -> bool:
        """The §4c criterion: bonds with H only need ratio < 2.5, others 0.68 < ratio < 1.32."""
        if self.with_hydrogen:
            return self.ratio < config.hydrogen_factor
        return 1 - config.bond_tolerance < self.ratio < 1 + config.bond_tolerance


def bond_table(structure: Structure, sites: list[int], config: ValidityConfig = ValidityConfig()) -> list[Bond]:
    """CrystalNN bonds of the given sites (CheckFailed when a bond's radii are unknown)."""
    crystal_nn, bonds = CrystalNN(), []
    for i in sites:
        site = structure[i]
        for neighbour in crystal_nn.get_nn_info(structure, i):
            if neighbour["site_index"] != i:
                a, b = site.specie, neighbour["site"].specie
                bonds.append(Bond(a, b, site.distance(neighbour["site"]), expected_bond_length(a, b, config)))
    return bonds


class CifChecker:
    """Runs the checks on one CIF; each check_* returns a pass reason or raises CheckFailed."""

    def __init__(self, cif: str, config: ValidityConfig):
        self.cif, self.config = cif, config
        self.structure: Structure | None = None
        self.tags: dict = {}
        self.detected_spacegroup: str | None = None
        self.equivalent_atoms: np.ndarray | None = None  # spglib orbit label per site
        self.stated_spacegroup: str | None = None
        self.stated_is_subgroup: bool | None = None
        self.sane = False

    def tag(self, name: str):
        if name not in self.tags:
            raise CheckFailed(f"missing {name}")
        return self.tags[name]

    def check_parses(self) -> str:
        if not isinstance(self.cif, str) or "data_" not in self.cif:
            raise CheckFailed("no CIF text (no data_ block)")
        too_big = cif_size_problem(self.cif)
        if too_big:
            raise CheckFailed(too_big)
        # Sites within 1e-3 (fractional) are one atom: 4-decimal coordinates such as
        # (0.1629, 0.3259) put symmetry images ~1e-4 apart, beyond pymatgen's default 1e-4.
        try:
            parser = CifParser.from_str(self.cif, site_tolerance=self.config.site_tolerance)
            structures = parser.parse_structures(primitive=False, on_error="raise")
        except MemoryError:
            raise
        except Exception as error:
            raise CheckFailed(parse_error_text(error)) from None
        if not structures or len(structures[0]) == 0:
            raise CheckFailed("pymatgen found no atoms")
        self.structure = structures[0]
        self.tags = next(iter(parser.as_dict().values()))
        stated = self.tags.get("_symmetry_space_group_name_H-M", self.tags.get("_space_group_name_H-M_alt"))
        self.stated_spacegroup = stated.strip() if isinstance(stated, str) else None
        return f"{len(self.structure)} sites in the cell"

    def check_formula_consistency(self) -> str:
        data_name = re.search(r"data_(\S+)", self.cif)
        if data_name is None:
            raise CheckFailed("the data_ line holds no formula")
        formulas = {
            "data_": Composition(data_name.group(1)),
            "_chemical_formula_sum": Composition(self.tag("_chemical_formula_sum")),
            "_chemical_formula_structural": Composition(self.tag("_chemical_formula_structural")),
        }
        reduced = {name: comp.reduced_formula for name, comp in formulas.items()}
        if len(set(reduced.values())) > 1:
            raise CheckFailed("formulas disagree: " + ", ".join(f"{n} {f}" for n, f in reduced.items()))
        stated, parsed = formulas["_chemical_formula_sum"], self.structure.composition
        tol = self.config.composition_tol
        if not stated.fractional_composition.almost_equals(parsed.fractional_composition, rtol=tol, atol=tol):
            raise CheckFailed(f"atoms in the cell make {formula_of(parsed)} but "
                              f"_chemical_formula_sum says {formula_of(stated)}")
        return f"{reduced['data_']} everywhere"

    def check_multiplicity(self) -> str:
        symbols = as_list(self.tag("_atom_site_type_symbol"))
        multiplicities = as_list(self.tag("_atom_site_symmetry_multiplicity"))
        counted: Counter = Counter()
        for symbol, multiplicity in zip(symbols, multiplicities, strict=True):
            counted[element_symbol(symbol)] += int(multiplicity)
        expected = Composition(self.tag("_chemical_formula_sum")).as_dict()
        for element in sorted(set(counted) | set(expected)):
            if counted[element] != expected.get(element, 0):
                raise CheckFailed(f"{element}: site multiplicities sum to {counted[element]}, "
                                  f"_chemical_formula_sum has {expected.get(element, 0):g}")
        return "site multiplicities add up to the formula sum"

    def stated_cell_problem(self) -> str | None:
        """A written cell parameter outside the sane ranges (clearer than the cell it makes)."""
        config = self.config
        for kind, names, (low, high), unit in (("length", "abc", config.length_range, "Å"),
                                               ("angle", ("alpha", "beta", "gamma"), config.angle_range, "°")):
            for name in names:
                try:
                    value = float(str(self.tags.get(f"_cell_{kind}_{name}")).split("(")[0])
                except ValueError:
                    continue
                if not (math.isfinite(value) and low <= value <= high):
                    return f"cell {kind} {name} = {value:g}{unit} is outside {low:g}–{high:g}{unit}"
        return None

    def check_sane_cell(self) -> str:
        problem = self.stated_cell_problem() or structure_problem(self.structure, self.config)
        if problem:
            raise CheckFailed(problem)
        self.sane = True
        return "cell lengths, angles and interatomic distances are plausible"

    def check_space_group(self) -> str:
        if not self.sane:
            raise CheckFailed("skipped: cell is not sane")
        if not self.stated_spacegroup:
            raise CheckFailed("no _symmetry_space_group_name_H-M")
        analyzer = SpacegroupAnalyzer(self.structure, symprec=self.config.symprec)
        self.detected_spacegroup = analyzer.get_space_group_symbol()
        self.equivalent_atoms = np.asarray(analyzer.get_symmetry_dataset().equivalent_atoms)
        if self.stated_spacegroup.replace(" ", "") != self.detected_spacegroup.replace(" ", ""):
            stated = self.stated_number()
            self.stated_is_subgroup = (stated is not None and
                                       stated in subgroup_numbers(analyzer.get_space_group_number()))
            raise CheckFailed(f"CIF states {self.stated_spacegroup} but the atoms have "
                              f"{self.detected_spacegroup} symmetry (symprec {self.config.symprec})")
        return f"{self.detected_spacegroup} confirmed"

    def stated_number(self) -> int | None:
        """The stated group's international number: the CIF's number tag, else read from the symbol."""
        for tag in ("_symmetry_Int_Tables_number", "_space_group_IT_number"):
            value = str(self.tags.get(tag, "")).strip()
            if value.isdigit() and 1 <= int(value) <= 230:
                return int(value)
        return space_group_number(self.stated_spacegroup)

    def check_bond_lengths(self) -> str:
        if not self.sane:
            raise CheckFailed("skipped: cell is not sane")
        if len(self.structure) > self.config.max_sites_for_bonds:
            raise CheckFailed(f"skipped: {len(self.structure)} sites is too many for bond analysis")
        per_atom = self.structure.volume / len(self.structure)
        if (per_atom > self.config.sparse_volume_per_atom
                and neighbour_search_size(self.structure) > self.config.max_neighbour_search):
            lengths = " × ".join(f"{x:.1f}" for x in self.structure.lattice.abc)
            raise CheckFailed(f"skipped: a {lengths} Å cell with {per_atom:.0f} Å³ per atom is too sparse "
                              "and long for the neighbour search")
        low, high = 1 - self.config.bond_tolerance, 1 + self.config.bond_tolerance
        # Symmetry-equivalent sites have the same bonds, so one site per orbit is enough
        # (CrystalNN dominates the cost of check_cif).
        if self.equivalent_atoms is not None and len(self.equivalent_atoms) == len(self.structure):
            sites = [int(i) for i in np.unique(self.equivalent_atoms)]
        else:
            sites = list(range(len(self.structure)))
        bonds = bond_table(self.structure, sites, self.config)
        bad = [(abs(math.log(b.ratio)) if b.ratio > 0 else math.inf,
                f"{b.a}–{b.b} {b.length:.2f} Å is {b.ratio:.2f}× the expected {b.expected:.2f} Å")
               for b in bonds if not b.within(self.config)]
        if not bonds:
            raise CheckFailed("CrystalNN found no bonds")
        if bad:
            raise CheckFailed(f"{max(bad)[1]} ({len(bad)} of {len(bonds)} bonds outside "
                              f"{low:.2f}–{high:.2f}×)")
        return (f"all {len(bonds)} bonds of the {len(sites)} symmetry-distinct sites within "
                f"{low:.2f}–{high:.2f}× of the expected lengths")


def run_check(name: str, check: Callable[[], str], seconds: float | None = None) -> CheckResult:
    try:
        with time_limit(seconds):
            return CheckResult(name, True, check())
    except CheckFailed as failure:
        return CheckResult(name, False, str(failure))
    except CheckTimeout:
        return CheckResult(name, False, f"timed out after {seconds:g} s")
    except MemoryError:  # the isolated checker's memory ceiling: it replaces the worker and says so
        raise
    except Exception as error:  # any crash is a failed check, never a failed batch
        return CheckResult(name, False, error_text(error))


def check_cif(cif_text: str, config: ValidityConfig = ValidityConfig(), time_limit: float | None = None) -> ValidityReport:
    """Run every validity check on a (repaired, standard) CIF. Never raises.

    time_limit bounds each check (seconds; only enforced on the main thread, as in the checker
    process of `isolation`).
    """
    checker = CifChecker(cif_text, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checks = [run_check("parses", checker.check_parses, time_limit)]
        for name in CHECK_NAMES[1:]:
            if checker.structure is None:
                checks.append(CheckResult(name, False, "skipped: CIF did not parse"))
            else:
                checks.append(run_check(name, getattr(checker, f"check_{name}"), time_limit))
    structure = checker.structure
    return ValidityReport(
        checks=checks,
        structure=structure,
        formula=structure.composition.reduced_formula if structure is not None else None,
        spacegroup=checker.detected_spacegroup or checker.stated_spacegroup,
        stated_spacegroup=checker.stated_spacegroup,
        stated_is_subgroup=checker.stated_is_subgroup,
    )
