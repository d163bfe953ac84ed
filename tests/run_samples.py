"""Runs and candidates for tests, built from prototypes (checked for real, no model needed)."""
from __future__ import annotations

from prototypes import rocksalt_nacl, rutile_tio2

from crystallm_core.chem.cif.cif_format import repair_generated_cif, structure_to_model_cif
from crystallm_core.chem.judges.isolation import check_sample
from crystallm_core.chem.judges.validity import check_cif
from crystallm_core.product.run import Candidate, Run, Scores, candidate_name


def written_cif(structure) -> str:
    """The CIF a generation run would write for this structure."""
    return repair_generated_cif(structure_to_model_cif(structure)).cif


def candidate(index: int, structure=None, target: float | None = 1.0, gap: float | None = None,
              e_hull: float | None = None) -> Candidate:
    """A checked candidate of `structure`, or an unrepairable one when it is None."""
    if structure is None:
        report = check_sample("data_[garbage", "eos", 0)[1]
        return Candidate(index, candidate_name(index, None), None, report, None, "data_[garbage", target, 0.0,
                         seconds=0.1, n_tokens=5, stop_reason="eos")
    cif = written_cif(structure)
    report = check_cif(cif)
    scores = Scores(band_gap_pred=gap, band_gap_std=None if gap is None else 0.1, e_hull_pred=e_hull)
    return Candidate(index, candidate_name(index, report.formula), cif, report, report.structure, "raw " + cif,
                     target, 0.0, scores, seconds=0.1, n_tokens=300, stop_reason="eos",
                     retries={"row": index, "cell": 0, "restart": 0, "reasons": {}})


def sample_run() -> Run:
    """NaCl twice (a duplicate), TiO2 at another target, one unrepairable sample: a small sweep."""
    candidates = [candidate(0, rocksalt_nacl(), gap=1.2, e_hull=0.0), candidate(1, rocksalt_nacl(), gap=0.2, e_hull=0.3),
                  candidate(2, rutile_tio2(), target=3.0, gap=2.8), candidate(3)]
    return Run(candidates, kind="sweep", model={"name": "tiny", "weights_sha256": "00" * 32},
               requests=[{"band_gap": 1.0, "e_hull": 0.0, "n": 3, "seed": 3},
                         {"band_gap": 3.0, "e_hull": 0.0, "n": 1, "seed": 4}],
               settings={"hit_tolerance": 0.5}, created_at=1_700_000_000.0)
