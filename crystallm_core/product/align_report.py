"""A round of `align` in numbers: rates over all samples, the sliders' response (by the gap
head and by the independent graph ensemble), the relaxed readings, and the collapse guard's
pooled valid∧unique∧novel rate."""
from __future__ import annotations

import pandas as pd

from crystallm_core.chem.judges.metrics import summarise
from crystallm_core.chem.judges.reward import ensemble_reading
from crystallm_core.chem.judges.surrogates.generated_gap import spearman as rank_correlation
from crystallm_core.product.align_examples import Example, prototypes


def spearman(x, y) -> float | None:
    """Rank correlation over the rows where both are known (None with fewer than 5 or a constant x)."""
    x, y = pd.Series(x, dtype=float), pd.Series(y, dtype=float)
    keep = x.notna() & y.notna()
    if keep.sum() < 5 or x[keep].nunique() < 2:
        return None
    return rank_correlation(x[keep].to_numpy(), y[keep].to_numpy())


def share_of(valid: pd.DataFrame, flag: str) -> float | None:
    """Share of the valid samples with `flag` (unique, novel) set; None without valid samples."""
    return round(float(valid[flag].fillna(False).astype(bool).mean()), 4) if len(valid) else None


def median_or_none(values) -> float | None:
    values = pd.Series(values, dtype=float).dropna()
    return float(values.median()) if len(values) else None


def ensemble_gap(frame: pd.DataFrame) -> pd.Series:
    """The graph ensemble's band gap per row (`reward.ensemble_reading`; NaN where it did not read)."""
    return pd.Series([ensemble_reading(row) for row in frame.to_dict("records")], index=frame.index, dtype=float)


def pooled_rate(reports: list[dict], key: str) -> float:
    """A rate over several rounds' samples together (each round weighted by its sample count)."""
    return sum(r[key] * r["n"] for r in reports) / max(sum(r["n"] for r in reports), 1)


def pooled_vun(rounds: list[dict], window: int) -> float | None:
    """valid∧unique∧novel over the last `window` rounds' samples together; None until there are
    that many (one round of 64–96 is too noisy to judge a 5-point fall: a binomial SE of about 3
    points; a run stopped after one update on a round that, asked of the base model, reads the same)."""
    return pooled_rate(rounds[-window:], "valid_unique_novel") if len(rounds) >= window else None


def prototype_variety(frame: pd.DataFrame) -> float | None:
    """Distinct prototypes per valid sample: how varied a round's structures are, whatever their
    exact formulas (a model collapsing onto A2BF6 elpasolites writes many formulas, one prototype)."""
    n_valid = int(frame["valid"].astype(bool).sum())
    if not n_valid:
        return None
    return round(prototypes(frame).dropna().nunique() / n_valid, 4)


def round_report(frame: pd.DataFrame, relaxed: list[dict], examples: list[Example], free_valid: float | None) -> dict:
    """Rates over all samples (stable, VSUN, hit, uniqueness, novelty) and the sliders' response."""
    rates = summarise(frame)
    valid = frame[frame["valid"].astype(bool)]
    with_gap = valid[valid["band_gap_target"].notna()]
    return {
        "n": int(len(frame)), **{k: round(v, 4) for k, v in rates.items() if k not in ("n", "mean_abs_error")},
        "unique_of_valid": share_of(valid, "unique"),
        "novel_of_valid": share_of(valid, "novel"),
        "prototype_variety": prototype_variety(frame),
        "median_e_hull": median_or_none(valid["e_hull_pred"]),
        "median_e_hull_at_0": median_or_none(valid.loc[valid["e_hull_target"] == 0.0, "e_hull_pred"]),
        "median_e_hull_at_0.5": median_or_none(valid.loc[valid["e_hull_target"] == 0.5, "e_hull_pred"]),
        "e_hull_spearman": spearman(valid["e_hull_target"], valid["e_hull_pred"]),
        "band_gap_spearman": spearman(with_gap["band_gap_target"], with_gap["band_gap_pred"]),
        # the graph ensemble (GNN + LightGBM) beside the head: a gain only the head sees is suspect
        "band_gap_spearman_ensemble": spearman(with_gap["band_gap_target"], ensemble_gap(with_gap)),
        "mean_reward": round(float(frame["reward"].mean()), 4),
        "relaxed_n": sum(1 for r in relaxed if r.get("valid")),
        "relax_failures": [r.get("error") for r in relaxed if not r.get("valid")][:3],
        "median_e_hull_relaxed": median_or_none([r.get("e_hull_pred") for r in relaxed if r.get("valid")]),
        "median_e_hull_static_of_relaxed": median_or_none([r.get("e_hull_static") for r in relaxed if r.get("valid")]),
        "median_gap_relaxed": median_or_none([r.get("band_gap_pred") for r in relaxed if r.get("valid")]),
        "free_decoding_valid": free_valid,
        "examples": {signal: sum(e.signal == signal for e in examples)
                     for signal in ("hindsight", "rejection", "relaxed", "replay")},
    }
