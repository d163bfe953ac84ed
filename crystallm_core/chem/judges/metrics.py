"""Per-structure and aggregated generation metrics, following the paper (reference §4).

Per structure: valid (every `check_cif` check passes), unique (no earlier structure of the
batch matches), novel (no train-split structure matches), stable (E_hull <= threshold),
hit (|predicted gap - target| <= tolerance) and VSUN = valid & unique & novel & stable.

Aggregated rates divide by ALL samples, as the paper does, so an invalid sample counts
against every rate. Paper conventions kept here: uniqueness is decided among valid structures
first (a valid structure is never a duplicate of an invalid one), and a hit needs a valid
structure (the paper ran ALIGNN on valid structures only). Unknown values (no target, no
prediction, no novelty index) are None/NaN and count as "no" in the rates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from pymatgen.core import Structure

from crystallm_core.chem.judges.novelty import NoveltyIndex, structure_matcher
from crystallm_core.chem.judges.validity import structure_problem


@dataclass
class MetricSettings:
    stability_threshold: float = 0.1  # eV/atom; the paper used 0.157 (0.1 + MACE MAE)
    hit_tolerance: float = 0.5  # eV


PAPER_OVERALL = {  # published CrystaLLM-pi bandgap model, 8 targets x 1000 samples (§4)
    "valid": 0.720, "valid_unique": 0.608, "valid_unique_novel": 0.485, "vsun": 0.196, "hit": 0.226,
    "vsun_hit": 0.0752,
}
PAPER_BY_TARGET = {  # target eV -> (valid, VSUN, hit), fractions of all samples
    0.072: (0.718, 0.273, 0.352), 0.180: (0.749, 0.253, 0.377), 0.681: (0.775, 0.233, 0.344),
    1.547: (0.710, 0.196, 0.239), 2.440: (0.704, 0.152, 0.185), 3.720: (0.646, 0.147, 0.154),
    6.776: (0.655, 0.156, 0.155), 12.145: (0.802, 0.161, 0.000),
}


def uniqueness_flags(
    structures: Sequence[Structure | None], valid: Sequence[bool] | None = None
) -> list[bool | None]:
    """First occurrence of each structure is unique; None where there is no structure.

    Structures are grouped by reduced formula first (different formulas never match), and
    valid structures are visited before invalid ones so validity decides who keeps the slot.
    """
    valid = list(valid) if valid is not None else [True] * len(structures)
    order = sorted(range(len(structures)), key=lambda i: (not valid[i], i))
    matcher = structure_matcher()
    kept: dict[str, list[Structure]] = {}
    flags: list[bool | None] = [None] * len(structures)
    for i in order:
        structure = structures[i]
        if structure is None or structure_problem(structure):
            continue
        group = kept.setdefault(structure.composition.reduced_formula, [])
        flags[i] = not any(matches(matcher, structure, other) for other in group)
        if flags[i]:
            group.append(structure)
    return flags


def matches(matcher, a: Structure, b: Structure) -> bool:
    """matcher.fit, with a degenerate structure that breaks the matcher counted as no match."""
    try:
        return matcher.fit(a, b)
    except Exception:
        return False


def novelty_flags(
    structures: Sequence[Structure | None], index: NoveltyIndex | None = None
) -> list[bool | None]:
    """Novel w.r.t. the training split; None where there is no structure or matching failed."""
    if index is None:  # not `or`: an empty index is falsy (it has __len__)
        index = NoveltyIndex.load()
    flags: list[bool | None] = []
    for structure in structures:
        try:
            flags.append(None if structure is None or structure_problem(structure) else index.is_novel(structure))
        except Exception:  # a pathological lattice can make the matcher fail: unknown, not a crash
            flags.append(None)
    return flags


def within(values: Iterable[float | None], target: float | None, tolerance: float) -> list[bool | None]:
    """|value - target| <= tolerance per value; None where the value or the target is unknown."""
    out: list[bool | None] = []
    for v in values:
        unknown = target is None or v is None or not np.isfinite(v)
        out.append(None if unknown else bool(abs(v - target) <= tolerance))
    return out


def add_flags(
    df: pd.DataFrame, band_gap_target: float | None = None, settings: MetricSettings | None = None
) -> pd.DataFrame:
    """Add `stable`, `hit` and `vsun` columns from valid / unique / novel / e_hull_pred / band_gap_pred.

    Cheap: call again with other thresholds without recomputing energies or predictions.
    """
    settings = settings or MetricSettings()
    df = df.copy()
    e_hull = pd.to_numeric(df["e_hull_pred"], errors="coerce")
    df["stable"] = [None if np.isnan(e) else bool(e <= settings.stability_threshold) for e in e_hull]
    gaps = pd.to_numeric(df["band_gap_pred"], errors="coerce")
    hits = within(gaps, band_gap_target, settings.hit_tolerance)
    df["hit"] = [None if h is None else bool(h and v) for h, v in zip(hits, df["valid"])]
    df["vsun"] = [truthy(v) and truthy(u) and truthy(n) and truthy(s)
                  for v, u, n, s in zip(df["valid"], df["unique"], df["novel"], df["stable"])]
    return df


def truthy(value) -> bool:
    """True only for a real True (None / NaN / False all count as no)."""
    return not pd.isna(value) and bool(value)


def column_true(df: pd.DataFrame, column: str) -> np.ndarray:
    if column not in df:
        return np.zeros(len(df), dtype=bool)
    return np.array([truthy(v) for v in df[column]], dtype=bool)


def funnel_counts(df: pd.DataFrame) -> dict[str, int]:
    """Nested counts for the app's funnel: all -> valid -> unique -> novel -> stable (VSUN)."""
    valid = column_true(df, "valid")
    unique = valid & column_true(df, "unique")
    novel = unique & column_true(df, "novel")
    stable = novel & column_true(df, "stable")
    return {"generated": len(df), "valid": int(valid.sum()), "unique": int(unique.sum()),
            "novel": int(novel.sum()), "stable": int(stable.sum())}


def summarise(df: pd.DataFrame, band_gap_target: float | None = None) -> dict[str, float]:
    """Aggregated rates over ALL rows of `df` (with flags from `add_flags`).

    valid_unique / valid_unique_novel / vsun are the nested funnel; `stable` counts valid and
    stable, `hit` valid hits (the paper's "valid ∧ hit"), `vsun_hit` VSUN hits; mean_abs_error is
    |predicted gap - target| over valid structures with a prediction.
    """
    n = len(df)
    counts = funnel_counts(df)
    rate = (lambda k: k / n) if n else (lambda k: float("nan"))
    summary = {
        "n": n,
        "valid": rate(counts["valid"]),
        "valid_unique": rate(counts["unique"]),
        "valid_unique_novel": rate(counts["novel"]),
        "vsun": rate(counts["stable"]),
        "stable": rate(int((column_true(df, "valid") & column_true(df, "stable")).sum())),
        "hit": rate(int(column_true(df, "hit").sum())),
        "vsun_hit": rate(int((column_true(df, "vsun") & column_true(df, "hit")).sum())),
        "mean_abs_error": float("nan"),
    }
    if band_gap_target is not None and "band_gap_pred" in df:
        gaps = pd.to_numeric(df["band_gap_pred"], errors="coerce")[column_true(df, "valid")]
        if gaps.notna().any():
            summary["mean_abs_error"] = float((gaps - band_gap_target).abs().mean())
    return summary


def hit_rate_curve(
    predictions: Sequence[float | None],
    valid: Sequence[bool],
    target: float,
    tolerances: Sequence[float] = tuple(np.round(np.arange(0.1, 2.01, 0.1), 2)),
) -> pd.DataFrame:
    """Hit rate (over all samples) as a function of the tolerance, for a curve in the app."""
    n = len(predictions)
    rates = []
    for tol in tolerances:
        hits = sum(bool(h) and bool(v) for h, v in zip(within(predictions, target, tol), valid))
        rates.append(hits / n if n else float("nan"))
    return pd.DataFrame({"tolerance": list(tolerances), "hit_rate": rates})
