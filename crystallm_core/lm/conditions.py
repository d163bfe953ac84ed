"""Target properties → the model's normalised condition vector.

The constants and transforms are the published CrystaLLM-pi bandgap model's (reference §3),
so a published checkpoint sees exactly the numbers it was trained on:

- band gap: power-log, n = (ln(1 + Eg) / ln(1 + 17.891)) ** 0.8
- E_hull:   linear, n = E_hull / 5.418

Unlike the original, out-of-range or NaN inputs are rejected with a clear message instead
of silently producing NaN or values > 1, and a property may be missing (None).
"""
from __future__ import annotations

import math

PROPERTIES = ("band_gap", "e_hull")  # the order of the condition vector
BAND_GAP_MAX = 17.891  # eV, largest gap in the published model's training data
E_HULL_MAX = 5.418  # eV/atom
BAND_GAP_EXPONENT = 0.8


def _check_value(value: float, name: str, unit: str, maximum: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be ≥ 0 {unit}, got {value:g} {unit}")
    if value > maximum:
        raise ValueError(f"{name} must be ≤ {maximum:g} {unit} (the model's range), got {value:g} {unit}")
    return value


def normalise_band_gap(band_gap_ev: float) -> float:
    """Band gap in eV → [0, 1] with the published power-log transform."""
    band_gap_ev = _check_value(band_gap_ev, "band gap", "eV", BAND_GAP_MAX)
    return (math.log1p(band_gap_ev) / math.log1p(BAND_GAP_MAX)) ** BAND_GAP_EXPONENT


def denormalise_band_gap(normalised: float) -> float:
    """Inverse of normalise_band_gap."""
    normalised = min(max(float(normalised), 0.0), 1.0)
    return math.expm1(normalised ** (1.0 / BAND_GAP_EXPONENT) * math.log1p(BAND_GAP_MAX))


def normalise_e_hull(e_hull_ev_per_atom: float) -> float:
    """Energy above hull in eV/atom → [0, 1], linear."""
    return _check_value(e_hull_ev_per_atom, "E_hull", "eV/atom", E_HULL_MAX) / E_HULL_MAX


def denormalise_e_hull(normalised: float) -> float:
    """Inverse of normalise_e_hull."""
    return min(max(float(normalised), 0.0), 1.0) * E_HULL_MAX


def condition_vector(band_gap: float | None, e_hull: float | None) -> tuple[list[float], list[bool]]:
    """Targets in physical units → (normalised values, present mask).

    A missing property (None) becomes value 0.0 with present=False; the model then uses its
    learned "unknown" embedding for it.
    """
    values = [
        0.0 if band_gap is None else normalise_band_gap(band_gap),
        0.0 if e_hull is None else normalise_e_hull(e_hull),
    ]
    return values, [band_gap is not None, e_hull is not None]
