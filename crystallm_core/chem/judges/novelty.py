"""Novelty against the training set: is a structure absent from the train split?

As in CrystaLLM-pi (reference §4), a structure is novel when no training structure with the
same reduced formula matches it under StructureMatcher(ltol=0.2, stol=0.3, angle_tol=5).

The index ships with the package (assets/novelty_index.json.gz) so a fresh clone works
offline: train-split structures of MP-20, MPTS-52 and WBM, grouped by reduced formula, each
stored as lattice parameters (Å, degrees, 4 decimals), species and fractional coordinates
(integers in units of 1e-4). Rounding moves atoms by < 0.01 Å, far inside the matcher's
tolerances. Rebuild with `python -m crystallm_core.chem.judges.novelty --build`.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
from functools import lru_cache
from pathlib import Path

import pandas as pd
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from crystallm_core.chem.data.splits import split_of
from crystallm_core.paths import ASSETS_DIR, cache_dir, data_dir

NOVELTY_INDEX_PATH = ASSETS_DIR / "novelty_index.json.gz"
COORD_SCALE = 10_000
RAW_SOURCES = {"mp20": "mp20/*.csv.gz", "mpts52": "mpts52/*.csv.gz", "wbm": "wbm/*.csv.gz"}


def structure_matcher() -> StructureMatcher:
    """The paper's matcher, shared by novelty and within-batch uniqueness."""
    return StructureMatcher(ltol=0.2, stol=0.3, angle_tol=5)


def encode_structure(structure: Structure) -> list:
    """[lattice parameters, species, flat fractional coordinates x 1e4] (JSON friendly)."""
    lattice = [round(x, 4) for x in structure.lattice.parameters]
    species = [site.specie.symbol for site in structure]
    coords = [round(float(x) % 1.0 * COORD_SCALE) % COORD_SCALE for x in structure.frac_coords.ravel()]
    return [lattice, species, coords]


def decode_structure(entry: list) -> Structure:
    lattice, species, coords = entry
    frac = [[c / COORD_SCALE for c in coords[i : i + 3]] for i in range(0, len(coords), 3)]
    return Structure(Lattice.from_parameters(*lattice), species, frac)


class NoveltyIndex:
    """Train-split structures grouped by reduced formula; `is_novel` matches same-formula entries."""

    def __init__(self, entries: dict[str, list], provenance: str = ""):
        self.entries = entries
        self.provenance = provenance
        self.matcher = structure_matcher()
        self.decoded: dict[str, list[Structure]] = {}  # formulas decoded so far (lazy)

    @classmethod
    def load(cls, path: Path | None = None) -> "NoveltyIndex":
        """The shipped index (cached per path); FileNotFoundError with a hint when it is missing."""
        return load_index(Path(path or NOVELTY_INDEX_PATH))

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def save(self, path: Path) -> None:
        payload = {"version": 1, "provenance": self.provenance, "entries": self.entries}
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
            json.dump(payload, f, separators=(",", ":"))

    def known_formula(self, reduced_formula: str) -> bool:
        """Composition novelty: whether any training structure has this reduced formula."""
        return reduced_formula in self.entries

    def training_structures(self, reduced_formula: str) -> list[Structure]:
        if reduced_formula not in self.decoded:
            self.decoded[reduced_formula] = [decode_structure(e) for e in self.entries.get(reduced_formula, [])]
        return self.decoded[reduced_formula]

    def is_novel(self, structure: Structure) -> bool:
        """True if no same-formula training structure matches."""
        structure = structure.copy()
        structure.remove_oxidation_states()  # a user's "Na+" must still match training "Na"
        formula = structure.composition.reduced_formula
        return not any(self.matcher.fit(structure, known) for known in self.training_structures(formula))


@lru_cache(maxsize=2)
def load_index(path: Path) -> NoveltyIndex:
    if not path.exists():
        raise FileNotFoundError(
            f"novelty index {path} not found; build it with `python -m crystallm_core.chem.judges.novelty --build`"
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        payload = json.load(f)
    return NoveltyIndex(payload["entries"], payload.get("provenance", ""))


def training_cifs() -> tuple[pd.DataFrame, str]:
    """(cif, source) rows of the training split: the prepared dataset if present, else raw files."""
    prepared = cache_dir() / "dataset.parquet"
    if prepared.exists():
        df = pd.read_parquet(prepared, columns=["source", "split", "cif"])
        missing = sorted(set(RAW_SOURCES) - set(df["source"]))
        if not missing:
            return df[df.split == "train"][["cif", "source"]], f"{prepared.name} (split == train)"
        print(f"{prepared} lacks {', '.join(missing)} (partial build?): reading the raw files instead")
    frames = []
    for source, pattern in RAW_SOURCES.items():
        for file in sorted(glob.glob(str(data_dir() / pattern))):
            frame = pd.read_csv(file)
            frame["source"] = source
            frame["key"] = frame["material_id"] if "material_id" in frame else frame["cif"]
            frames.append(frame[["cif", "source", "key"]])
    if not frames:
        raise FileNotFoundError(f"no training data under {data_dir()}")
    df = pd.concat(frames, ignore_index=True).drop_duplicates("key")  # the pilot / MPTS-52 files overlap MP-20
    return df[["cif", "source"]], "raw mp20 + mpts52 + wbm CSVs, train split by splits.split_of"


def build_index(progress: bool = True) -> NoveltyIndex:
    """Parse every training CIF, keep train-split formulas, group by reduced formula."""
    df, origin = training_cifs()
    entries: dict[str, list] = {}
    seen: set[str] = set()
    rows = df.itertuples(index=False)
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, total=len(df), desc="novelty index")
    for row in rows:
        structure = Structure.from_str(row.cif, fmt="cif")
        formula = structure.composition.reduced_formula
        if split_of(formula) != "train":
            continue
        entry = encode_structure(structure)
        key = json.dumps(entry)  # the same structure listed twice (overlapping sources)
        if key not in seen:
            seen.add(key)
            entries.setdefault(formula, []).append(entry)
    provenance = (
        f"{sum(len(v) for v in entries.values())} train-split structures, {len(entries)} reduced "
        f"formulas, from {origin}. Data: MP-20 and MPTS-52 (Materials Project, CC-BY-4.0, via "
        "SymmetryAdvantage/WyckoffTransformer) and WBM (Wang et al. 2021). "
        "Built by crystallm_core.chem.judges.novelty.build_index."
    )
    return NoveltyIndex(dict(sorted(entries.items())), provenance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the shipped novelty index from the training split.")
    parser.add_argument("--build", action="store_true", help="rebuild the index")
    parser.add_argument("--out", type=Path, default=NOVELTY_INDEX_PATH)
    args = parser.parse_args(argv)
    if args.build:
        index = build_index()
        index.save(args.out)
        print(f"{index.provenance}\nwrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
