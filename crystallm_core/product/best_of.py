"""Best N of K: sample N·K structures, keep the N the ranking scores best, relax those together.

The Generate page, `generate --best-of K`, sweeps and `scripts/measure_response.py` share it:
a request with `keep_best = N` samples `n = N·K`; each candidate is checked and scored as it
arrives (the caller's scorer), then `finish` picks the N best by `chem.judges.ranking`'s score among
the valid samples whose gap reading is within the hit tolerance of the target (all valid ones
without a gap target). When fewer are within the tolerance, fewer are picked and the run
says how many were: the list is not padded with misses. With `relax`, the picked structures
are relaxed together (`repair.relax_many`: one CHGNet forward per optimiser step for all of them),
re-checked and re-scored; the relaxed CIF is kept beside the model's own (repaired/).

The pick uses the same band-gap surrogate that then shows the hit: a ranked hit rate is what that
surrogate predicts, not a measurement (PREDICTION_NOTE).
"""
from __future__ import annotations

import math

import pandas as pd

from crystallm_core.chem.judges.ranking import E_HULL_SCALE, pick_best
from crystallm_core.chem.decoding.repair import relax_many
from crystallm_core.chem.judges.scoring import StructureScorer
from crystallm_core.chem.judges.structure_info import parse_cif
from crystallm_core.product.run import Candidate, Run

BEST_OF_CHOICES = (1, 2, 4, 8)
PREDICTION_NOTE = (
    "Picked by the same band-gap surrogate that reads the hit: the picked structures' hit rate is that "
    "surrogate's prediction, not a measurement. The GNN and LightGBM columns are those two models' own "
    "readings (in the surrogate they only vote with a small share, larger on unrelaxed structures): where "
    "they disagree with it, treat the hit with care.")


def best_of_counts(n: int, best_of: int) -> dict:
    """`n` (samples drawn) and `keep_best` of a request delivering the best n of n × best_of."""
    if best_of < 1:
        raise ValueError(f"best-of must be at least 1, got {best_of}")
    return {"n": n * best_of, "keep_best": n if best_of > 1 else None}


def pick(run: Run, candidates: list[Candidate], keep: int, band_gap_target: float | None) -> dict:
    """Mark each of `candidates` (one request's, all in `run`) picked or not; the counts."""
    frame = run.to_frame()  # scores, hits and uniqueness within the run
    mine = frame.set_index("index").loc[[c.index for c in candidates]]
    valid = mine["valid"].astype(bool)
    within = valid & mine["hit"].fillna(False).astype(bool) if band_gap_target is not None else valid
    picked = pick_best(mine["score"], keep, within)
    for candidate in candidates:
        candidate.pick = {"picked": bool(picked[candidate.index]), "of": len(candidates), "keep": keep}
    return {"keep": keep, "sampled": len(candidates), "valid": int(valid.sum()),
            "within_tolerance": int(within.sum()), "picked": int(picked.sum()),
            "tolerance": run.metric_settings().hit_tolerance, "band_gap_target": band_gap_target,
            **e_hull_reach(mine, valid, picked, candidates[0].e_hull_target if candidates else None)}


def e_hull_reach(table: pd.DataFrame, valid: pd.Series, picked: pd.Series, target: float | None) -> dict:
    """How close to the E_hull target the samples came (static CHGNet readings): the valid
    samples within E_HULL_SCALE of it, and the picked structures' median."""
    if target is None or pd.isna(target):
        return {"e_hull_target": None, "near_e_hull_target": None, "picked_e_hull_median": None}
    readings = table["e_hull_pred"].astype(float)
    near = valid & (readings <= float(target) + E_HULL_SCALE)
    chosen = readings[picked].dropna()
    return {"e_hull_target": float(target), "near_e_hull_target": int(near.sum()),
            "picked_e_hull_median": float(chosen.median()) if len(chosen) else None}


def relax_picked(candidates: list[Candidate], scorer: StructureScorer | None) -> list[Candidate]:
    """Relax the picked candidates together; each relaxed CIF re-checked (relax_many) and
    re-scored (band gap, E_hull at the relaxed geometry, novelty) into the repair's details.
    Returns the candidates that changed."""
    chosen = [c for c in candidates if c.pick and c.pick["picked"] and c.structure is not None]
    if not chosen:
        return []
    repairs = relax_many([c.structure for c in chosen], [c.report for c in chosen])
    relaxed = [structure_of(r.cif) if r is not None else None for r in repairs]
    rescored = scorer.score(relaxed) if scorer is not None else [{} for _ in relaxed]
    for candidate, repair, scores in zip(chosen, repairs, rescored):
        if repair is None:
            continue
        if scores:
            repair.details["scores_after"] = {k: v for k, v in scores.items()
                                              if not (isinstance(v, float) and not math.isfinite(v))}
        candidate.repairs = [r for r in candidate.repairs if r["kind"] != "relax"] + [repair.to_dict()]
    return chosen


def structure_of(cif: str | None):
    try:
        return parse_cif(cif) if cif else None
    except ValueError:
        return None


def finish(run: Run, candidates: list[Candidate], request, scorer: StructureScorer | None) -> list[Candidate]:
    """Pick (and with request.relax, relax) the best of a request's candidates; the summary goes
    into the request's generation record. Returns the candidates to store again."""
    if not request.keep_best:
        return []
    summary = pick(run, candidates, request.keep_best, request.band_gap)
    if run.generation:
        run.generation[-1]["best_of"] = summary
    if request.relax:
        relax_picked(candidates, scorer)
    return candidates


def e_hull_note(summary: dict) -> str | None:
    """When the picks sit well above the E_hull target: how many samples came near it. The
    ranking can only choose among what the model wrote; relaxing the picks lowers their E_hull."""
    target, median = summary.get("e_hull_target"), summary.get("picked_e_hull_median")
    if target is None or median is None or median <= target + E_HULL_SCALE:
        return None
    return (f"{summary['near_e_hull_target']} of {summary['sampled']} samples read an E_hull within "
            f"{E_HULL_SCALE:g} eV/atom of the {target:g} eV/atom target (static CHGNet); the picked structures' "
            f"median is {median:.2f} eV/atom. The model does not yet follow the E_hull slider (model card); "
            f"relaxing the picks lowers their E_hull (on the paper targets a median 1.57 -> 0.14 eV/atom).")


def shortfall_note(summary: dict) -> str | None:
    """"3 of 64 samples were within the tolerance" when fewer than N could be picked."""
    if summary["picked"] >= summary["keep"]:
        return None
    if summary["band_gap_target"] is None:
        return (f"Only {summary['valid']} of {summary['sampled']} samples were valid: {summary['picked']} picked "
                f"of the {summary['keep']} asked for.")
    return (f"{summary['within_tolerance']} of {summary['sampled']} samples were within the tolerance "
            f"(gap reading within ±{summary['tolerance']:g} eV of {summary['band_gap_target']:g} eV): "
            f"{summary['picked']} picked of the {summary['keep']} asked for, rather than padding the list with misses.")
