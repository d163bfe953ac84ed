"""Scores of finished structures: surrogate band gap, CHGNet stability and novelty.

One implementation for the app (a structure at a time, as they stream in) and `evaluate`
(a folder of files). Each component is loaded once; one that cannot be loaded (no surrogate
weights, no CHGNet, no novelty index) is named in `unavailable` with why, and its scores are
left out, never invented. A failure on one structure becomes that structure's note.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

from pymatgen.core import Structure

from crystallm_core.chem.judges import stability as stability_estimates
from crystallm_core.chem.judges.crowding import chgnet_problem
from crystallm_core.chem.judges.metrics import novelty_flags
from crystallm_core.chem.judges.stability import RelaxSettings
from crystallm_core.chem.judges.validity import structure_problem

GAP_COLUMNS = ("band_gap_gnn", "band_gap_gbm", "band_gap_pred", "band_gap_std", "p_metal")
STABILITY_COLUMNS = ("e_form_pred", "e_hull_pred")
SCORE_COLUMNS = (*GAP_COLUMNS, *STABILITY_COLUMNS, "novel")
# Training cells have at most 52 sites. Beyond ~100 the matcher (novelty) and CHGNet take minutes
# and gigabytes per structure (256 sites: 48 s and 1.8 GB for novelty alone), so they are not run.
MAX_SCORED_SITES = 100


@lru_cache(maxsize=1)
def load_gap_model():
    from crystallm_core.chem.judges.surrogates import BandGapSurrogate

    return BandGapSurrogate.load()


def why(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


@lru_cache(maxsize=1)
def load_independent_gap_model():
    """The older GNN + LightGBM ensemble (v1): a band-gap reading independent of the CHGNet head
    that the ranking picks with, shown beside it (band_gap_gnn, band_gap_gbm)."""
    from crystallm_core.chem.judges.surrogates.ensemble import V1_CONFIG, BandGapSurrogate

    return BandGapSurrogate.load(config=V1_CONFIG)


class StructureScorer:
    """Scores keyed like `SCORE_COLUMNS` (band_gap_pred, band_gap_std, e_hull_pred, novel, …),
    so the metrics functions apply to both the app's tables and `evaluate`'s CSV."""

    def __init__(self, stability: bool = True, relax: RelaxSettings | None = None, novelty: bool = True,
                 surrogate: bool = True, max_sites: int = MAX_SCORED_SITES, independent_gap: bool = True):
        self.relax, self.max_sites = relax, max_sites
        self.unavailable: dict[str, str] = {}  # score family -> why it is missing
        self.gap_model = self.independent_gap_model = self.novelty_index = None
        self.wants_independent_gap = surrogate and independent_gap
        self.with_stability = stability
        if surrogate:
            try:
                self.gap_model = load_gap_model()
            except Exception as error:
                self.unavailable["band gap"] = f"band-gap surrogate unavailable ({why(error)})"
        if stability:
            try:  # once here, not per structure: a missing CHGNet would otherwise be retried every time
                stability_estimates.load_chgnet()
            except Exception as error:
                self.with_stability = False
                self.unavailable["stability"] = f"CHGNet not available ({why(error)})"
        if novelty:
            try:
                from crystallm_core.chem.judges.novelty import NoveltyIndex

                self.novelty_index = NoveltyIndex.load()
            except Exception as error:
                self.unavailable["novelty"] = f"novelty index not available ({why(error)})"

    def score(self, structures: Sequence[Structure | None]) -> list[dict]:
        """One dict per structure: finite scores only, plus `notes` where one could not be computed."""
        rows: list[dict] = [{} for _ in structures]
        notes: list[list[str]] = [[] for _ in structures]
        present = []
        for i, structure in enumerate(structures):
            problem = self.problem(structure)
            if problem:  # native code (CHGNet, graph builders, spglib) never sees such a cell
                notes[i].append(f"not scored: {problem}")
            elif structure is not None:
                present.append(i)
        batch = [structures[i] for i in present]
        chgnet = None  # CHGNet's features from the stability pass, reused by the band-gap head
        if self.with_stability and batch:
            chgnet = self.add_stability(batch, [rows[i] for i in present], [notes[i] for i in present])
        if self.gap_model is not None and batch:
            self.add_gaps(batch, [rows[i] for i in present], [notes[i] for i in present], chgnet)
        if self.novelty_index is not None and batch:
            for i, novel in zip(present, novelty_flags(batch, self.novelty_index)):
                rows[i]["novel"] = novel
        for row, row_notes in zip(rows, notes):
            if row_notes:
                row["notes"] = "; ".join(row_notes)
        return rows

    def problem(self, structure: Structure | None) -> str | None:
        """Why a structure is not scored (None: it is, or there is none)."""
        if structure is None:
            return None
        if len(structure) > self.max_sites:
            return f"{len(structure)} sites is more than the {self.max_sites} the scorers handle"
        return structure_problem(structure) or chgnet_problem(structure)

    def add_gaps(self, structures: list[Structure], rows: list[dict], notes: list[list[str]],
                 chgnet: list | None = None) -> None:
        try:
            predictions = self.gap_model.predict(structures, chgnet=chgnet)
        except Exception as error:
            for row_notes in notes:
                row_notes.append(f"band gap failed: {why(error)}")
            return
        for row, row_notes, gap in zip(rows, notes, predictions):
            if gap.reason:
                row_notes.append(f"band gap: {gap.reason}")
            else:  # a reading that is not an ensemble member is NaN: left out
                values = dict(band_gap_gnn=gap.gnn, band_gap_gbm=gap.gbm, band_gap_pred=gap.mean,
                              band_gap_std=gap.std, p_metal=gap.p_metal)
                row.update({name: value for name, value in values.items() if math.isfinite(value)})
        wanted = [i for i, row in enumerate(rows) if "band_gap_pred" in row and "band_gap_gnn" not in row]
        if wanted and self.independent_model() is not None:
            self.add_independent_gaps([structures[i] for i in wanted], [rows[i] for i in wanted],
                                      [notes[i] for i in wanted])

    def independent_model(self):
        """The older GNN + LightGBM ensemble, loaded on first need: an ensemble with those two as
        members (v4.1 on) fills their columns itself, from the same files, and never needs it."""
        if self.independent_gap_model is None and self.wants_independent_gap \
                and "independent band gap" not in self.unavailable:
            try:
                self.independent_gap_model = load_independent_gap_model()
            except Exception as error:
                self.unavailable["independent band gap"] = f"GNN + LightGBM reading unavailable ({why(error)})"
        return self.independent_gap_model

    def add_independent_gaps(self, structures: list[Structure], rows: list[dict], notes: list[list[str]]) -> None:
        """band_gap_gnn / band_gap_gbm from the older ensemble, beside the head's reading."""
        try:
            predictions = self.independent_gap_model.predict(structures)
        except Exception as error:
            for row_notes in notes:
                row_notes.append(f"independent band gap failed: {why(error)}")
            return
        for row, gap in zip(rows, predictions):
            values = dict(band_gap_gnn=gap.gnn, band_gap_gbm=gap.gbm)
            row.update({name: value for name, value in values.items() if math.isfinite(value)})

    def add_stability(self, structures: list[Structure], rows: list[dict], notes: list[list[str]]) -> list | None:
        """Add E_form / E_hull; return each structure's CHGNet features (None where missing)."""
        try:
            estimates = stability_estimates.estimate_stability(
                structures, relax=self.relax is not None, relax_settings=self.relax)
        except Exception as error:
            for row_notes in notes:
                row_notes.append(f"stability failed: {why(error)}")
            return None
        for row, row_notes, estimate in zip(rows, notes, estimates):
            if estimate.e_form_per_atom is not None:
                row["e_form_pred"] = estimate.e_form_per_atom
            if estimate.e_hull is not None:
                row["e_hull_pred"] = estimate.e_hull
            if estimate.error:
                row_notes.append(f"stability: {estimate.error}")
        return [estimate.features for estimate in estimates]


@lru_cache(maxsize=1)
def default_scorer() -> StructureScorer:
    """One scorer per process for the app (the surrogate and CHGNet are loaded once)."""
    return StructureScorer()
