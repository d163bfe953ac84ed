"""CHGNet features (crystal vector and atom features) of the band-gap rows of the training table,
cached by row id.

    OMP_NUM_THREADS=1 nice -n 15 python -m crystallm_core.chem.judges.surrogates.chgnet_cache

One CHGNet forward per structure (~5-8 ms on one CPU thread for MP-20-sized cells); the
cache (cache_dir()/chgnet_features.npz) is rewritten every few thousand rows so that an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pymatgen.core import Structure

from crystallm_core.chem.judges.chgnet_features import (
    ATOM_FEATURE_DIM,
    ChgnetFeatures,
    chgnet_feature_names,
)
from crystallm_core.chem.judges.stability import static_readings
from crystallm_core.paths import cache_dir

CACHE_FILE = "chgnet_features.npz"


def blank_features() -> ChgnetFeatures:
    """A row that could not be read: NaN crystal vector, no atoms."""
    return ChgnetFeatures(np.full(len(chgnet_feature_names()), np.nan, np.float32),
                          np.zeros((0, ATOM_FEATURE_DIM), np.float32))


def read_cache(cache: Path) -> dict[str, ChgnetFeatures]:
    """Row id -> features, or {} when the cache is absent or was made with other features."""
    if not cache.exists():
        return {}
    stored = np.load(cache, allow_pickle=False)
    if list(stored["feature_names"]) != chgnet_feature_names() or "atoms" not in stored:
        return {}
    atoms = np.split(stored["atoms"], np.cumsum(stored["sizes"])[:-1])
    unread = np.full(len(stored["ids"]), np.nan)  # caches from before the forces were read
    force, stress = (stored[k] if k in stored else unread for k in ("force_rms", "stress_max"))
    return {row_id: ChgnetFeatures(crystal, block, float(f), float(s))
            for row_id, crystal, block, f, s in zip(stored["ids"], stored["features"], atoms, force, stress)}


def write_cache(cache: Path, known: dict[str, ChgnetFeatures]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(".tmp.npz")
    rows = list(known.values())
    np.savez(temporary, ids=np.array(list(known), dtype=str), features=np.stack([r.crystal for r in rows]),
             sizes=np.array([len(r.atoms) for r in rows]), atoms=np.concatenate([r.atoms for r in rows]),
             force_rms=np.array([r.force_rms for r in rows]), stress_max=np.array([r.stress_max for r in rows]),
             feature_names=np.array(chgnet_feature_names()))
    temporary.replace(cache)


def features_of_cifs(cifs: list[str], batch_size: int = 32) -> list[ChgnetFeatures]:
    """CHGNet features of CIF texts; `blank_features()` where parsing or CHGNet fails."""
    structures: list[Structure | None] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cif in cifs:
            try:
                structures.append(Structure.from_str(cif, fmt="cif"))
            except Exception:  # counted as a failed row by the caller
                structures.append(None)
    parsed = [i for i, s in enumerate(structures) if s is not None]
    out = [blank_features() for _ in cifs]
    readings = static_readings([structures[i] for i in parsed], batch_size=batch_size)
    for i, reading in zip(parsed, readings):
        if not isinstance(reading, str):
            out[i] = reading.features
    return out


def cached_chgnet_features(table: pd.DataFrame, cache: Path, chunk: int = 2000, verbose: bool = True,
                           ) -> tuple[np.ndarray, list[np.ndarray]]:
    """((len(table), n_features) crystal vectors, each row's (n_sites, ATOM_FEATURE_DIM) atom features)
    for `table` (columns id, cif); a failed row is NaN with no atoms. Computes only rows not cached."""
    rows = cached_features(table, cache, chunk, verbose)
    return np.stack([r.crystal for r in rows]), [r.atoms for r in rows]


def cached_features(table: pd.DataFrame, cache: Path, chunk: int = 2000, verbose: bool = True,
                    ) -> list[ChgnetFeatures]:
    """Each row's `ChgnetFeatures` (`blank_features()` where it failed), as `cached_chgnet_features`."""
    known = read_cache(cache)
    todo = [i for i, row_id in enumerate(table.id) if row_id not in known]
    start = time.time()
    for first in range(0, len(todo), chunk):
        rows = todo[first:first + chunk]
        for i, features in zip(rows, features_of_cifs(table.cif.iloc[rows].tolist())):
            known[table.id.iloc[i]] = features
        write_cache(cache, known)
        if verbose:
            done = first + len(rows)
            print(f"CHGNet features: {done}/{len(todo)} ({1000 * (time.time() - start) / done:.1f} ms/row)",
                  flush=True)
    return [known[row_id] for row_id in table.id]


def band_gap_rows(dataset: Path) -> pd.DataFrame:
    """The labelled rows every band-gap reading trains and is scored on."""
    table = pd.read_parquet(dataset, columns=["id", "source", "band_gap", "split", "cif"])
    return table[table.band_gap.notna()].reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Cache CHGNet crystal features of the band-gap rows.")
    parser.add_argument("--dataset", type=Path, default=cache_dir() / "dataset.parquet")
    parser.add_argument("--cache", type=Path, default=cache_dir() / CACHE_FILE)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    features, _ = cached_chgnet_features(band_gap_rows(args.dataset), args.cache)
    print(f"{len(features)} rows, {int(np.isnan(features).all(axis=1).sum())} failed")


if __name__ == "__main__":
    main()
