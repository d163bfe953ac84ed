"""Formation-energy convex hull of known phases → energy above hull of any composition.

Every known phase becomes a pymatgen `PDEntry(composition, e_form_per_atom × n_atoms)`, with
the elements at 0 eV/atom, so the hull is built directly on formation energies (no total
energies or MP2020 corrections needed). The phases are the MP-20 / MPTS-52 structures and the
labels parquet of the shared data (see its README), i.e. only MP-20-like, near-hull materials:
the real Materials Project hull holds many more phases, so an E_hull computed here is biased
LOW (a structure can look stable or even below the hull when a competing phase is simply
missing). Say so wherever such a number is shown.

One `PhaseDiagram` per chemical system is built on demand from the entries whose elements are
a subset of the system and cached; a single diagram for everything would take minutes.
The shipped table (`assets/hull_reference.csv.gz`) keeps only the hull vertices (the lowest
entry of each formula that is stable in its own chemical system), which defines exactly the
same hull, so a fresh clone works offline.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import warnings
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

import pandas as pd
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition

from crystallm_core.paths import ASSETS_DIR, data_dir

DEFAULT_TABLE = ASSETS_DIR / "hull_reference.csv.gz"
ELEMENT_REFERENCES = "references/2023-02-07-mp-elemental-reference-entries.json"
TABLE_COLUMNS = ["formula", "e_form_per_atom", "source_id"]
FORMULA_SUM = re.compile(r"_chemical_formula_sum\s+'?([^'\n]+)'?")


def read_phase_table(data_dir: Path) -> pd.DataFrame:
    """All known phases of the raw shared data: one row per entry (formula, e_form, id)."""
    data_dir = Path(data_dir)
    references = json.loads((data_dir / ELEMENT_REFERENCES).read_text())
    # The elemental ground states define the formation-energy zero: all at 0 eV/atom.
    elements = pd.DataFrame(
        {
            "formula": list(references),
            "e_form_per_atom": 0.0,
            "source_id": [entry.get("data", {}).get("material_id", entry.get("entry_id", symbol))
                          for symbol, entry in references.items()],
        }
    )
    labels = pd.read_parquet(data_dir / "labels" / "mp20_hulls_mace_above_hull_dataset.parquet")
    labels = pd.DataFrame(
        {
            "formula": [Composition(Counter(species)).formula for species in labels["species_at_sites"]],
            "e_form_per_atom": labels["formation_energy_per_atom"],
            "source_id": labels["material_id"],
        }
    )
    mp20 = pd.concat([pd.read_csv(f) for f in sorted((data_dir / "mp20").glob("*.csv.gz"))])
    mp20 = pd.DataFrame(
        {
            "formula": mp20["pretty_formula"],
            "e_form_per_atom": mp20["formation_energy_per_atom"],
            "source_id": mp20["material_id"],
        }
    )
    mpts = pd.concat([pd.read_csv(f) for f in sorted((data_dir / "mpts52").glob("*.csv.gz"))])
    mpts = pd.DataFrame(
        {
            "formula": mpts["cif"].str.extract(FORMULA_SUM, expand=False).str.strip(),
            "e_form_per_atom": mpts["formation_energy_per_atom"],
            "source_id": mpts["material_id"],
        }
    )
    table = pd.concat([elements, labels, mp20, mpts], ignore_index=True)
    return table.dropna(subset=["formula", "e_form_per_atom"]).reset_index(drop=True)


def chemical_system(composition: Composition) -> tuple[str, ...]:
    """Sorted element symbols, e.g. ("Fe", "O")."""
    return tuple(sorted(el.symbol for el in composition.elements))


class HullReference:
    """Convex hull of known formation energies; `e_above_hull` for any composition."""

    def __init__(self, table: pd.DataFrame, cache_size: int = 4096):
        table = table[TABLE_COLUMNS].reset_index(drop=True)
        compositions = [Composition(f) for f in table["formula"]]
        with warnings.catch_warnings():  # noble gases have no Pauling electronegativity
            warnings.simplefilter("ignore", UserWarning)
            names = [c.reduced_formula for c in compositions]
        self.elements = {chemical_system(c)[0] for c in compositions if len(c.elements) == 1}
        by_system: dict[tuple[str, ...], list[PDEntry]] = defaultdict(list)
        keep = []
        for i, (comp, name, e_form, source_id) in enumerate(
            zip(compositions, names, table["e_form_per_atom"], table["source_id"])
        ):
            system = chemical_system(comp)
            if not set(system) <= self.elements:  # no reference state: cannot sit on any hull
                continue
            entry = PDEntry(comp, float(e_form) * comp.num_atoms, name=name)
            entry.entry_id = str(source_id)
            by_system[system].append(entry)
            keep.append(i)
        self.table = table.iloc[keep].reset_index(drop=True)
        self.entries_by_system = dict(by_system)
        self.phase_diagram = lru_cache(maxsize=cache_size)(self.build_phase_diagram)

    # ---- construction / persistence -------------------------------------------------------
    @classmethod
    def from_data_dir(cls, data_dir: Path, vertices_only: bool = True) -> "HullReference":
        """Build from the raw shared data; keep only hull vertices unless told otherwise."""
        with warnings.catch_warnings():  # noble gases have no Pauling electronegativity
            warnings.simplefilter("ignore", UserWarning)
            table = read_phase_table(Path(data_dir))
            table["reduced"] = [Composition(f).reduced_formula for f in table["formula"]]
        # Only the lowest entry of a formula can be on a hull.
        table = table.sort_values("e_form_per_atom", kind="stable").drop_duplicates("reduced")
        table = table.assign(formula=table["reduced"]).sort_values("formula")
        reference = cls(table)
        return reference.vertices() if vertices_only else reference

    def vertices(self) -> "HullReference":
        """A reference holding only the stable entries: the same hull, a much smaller table."""
        systems = sorted(self.entries_by_system, key=len, reverse=True)
        maximal: list[tuple[str, ...]] = []
        for system in systems:  # a system's stable set includes those of all its subsystems
            if not any(set(system) <= set(big) for big in maximal):
                maximal.append(system)
        stable_ids: set[str] = set()
        for system in maximal:
            stable_ids.update(e.entry_id for e in self.build_phase_diagram(system).stable_entries)
        return HullReference(self.table[self.table["source_id"].astype(str).isin(stable_ids)])

    def save(self, path: Path = DEFAULT_TABLE) -> Path:
        """Write the compact table (formula, e_form_per_atom, source_id) as gzipped CSV."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.table.to_csv(path, index=False, float_format="%.6f")
        return path

    @classmethod
    def load(cls, path: Path = DEFAULT_TABLE) -> "HullReference":
        """Read a table written by `save` (default: the shipped offline copy)."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"hull reference table not found: {path} (run prepare-data)")
        return cls(pd.read_csv(path, dtype={"formula": str, "source_id": str}))

    # ---- queries --------------------------------------------------------------------------
    def build_phase_diagram(self, system: tuple[str, ...]) -> PhaseDiagram:
        """PhaseDiagram of every entry whose elements are a subset of `system` (uncached)."""
        entries = []
        for size in range(1, len(system) + 1):
            for subsystem in itertools.combinations(system, size):
                entries.extend(self.entries_by_system.get(subsystem, ()))
        return PhaseDiagram(entries)

    def composition(self, composition: Composition | str) -> Composition:
        """Parse and validate: every element must have a reference state."""
        try:
            comp = Composition(composition)
        except Exception as err:  # pymatgen raises several types for bad formulas
            raise ValueError(f"cannot read composition {composition!r}: {err}") from None
        if comp.num_atoms <= 0:
            raise ValueError(f"composition {composition!r} is empty")
        unknown = sorted(set(chemical_system(comp)) - self.elements)
        if unknown:
            raise ValueError(
                f"no hull reference for element(s) {', '.join(unknown)} in {comp.reduced_formula}"
            )
        return comp

    def decomposition_and_e_above_hull(
        self, composition: Composition | str, e_form_per_atom: float
    ) -> tuple[dict[str, float], float]:
        """(hull phases → molar fraction, energy above hull in eV/atom, negative if below)."""
        comp = self.composition(composition)
        if not pd.notna(e_form_per_atom):
            raise ValueError(f"formation energy must be a finite number, got {e_form_per_atom}")
        entry = PDEntry(comp, float(e_form_per_atom) * comp.num_atoms)
        diagram = self.phase_diagram(chemical_system(comp))
        decomposition, e_above = diagram.get_decomp_and_e_above_hull(
            entry, allow_negative=True, check_stable=False
        )
        fractions = {f"{e.name} ({e.entry_id})": float(x) for e, x in decomposition.items()}
        return fractions, float(e_above)

    def e_above_hull(self, composition: Composition | str, e_form_per_atom: float) -> float:
        """Energy above the hull in eV/atom (negative = below the known hull)."""
        return self.decomposition_and_e_above_hull(composition, e_form_per_atom)[1]

    def decomposition(self, composition: Composition | str, e_form_per_atom: float) -> dict[str, float]:
        """Hull phases ("formula (source id)") a composition decomposes into, with fractions."""
        return self.decomposition_and_e_above_hull(composition, e_form_per_atom)[0]


def main(argv: list[str] | None = None) -> int:
    """Rebuild the shipped hull table: `python -m crystallm_core.chem.data.hull [--data-dir D] [--out F]`."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, default=None, help="raw shared data (default: data_dir())")
    parser.add_argument("--out", type=Path, default=DEFAULT_TABLE, help="table to write")
    args = parser.parse_args(argv)
    reference = HullReference.from_data_dir(args.data_dir or data_dir())
    path = reference.save(args.out)
    print(f"wrote {len(reference.table)} hull vertices to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
