"""Optional repairs after decoding: recorded beside the model's CIF, counted apart, in every output."""
from __future__ import annotations

import io
import zipfile

import pytest
from prototypes import rocksalt_nacl, rutile_tio2
from run_samples import sample_run

from crystallm_core.chem.cif.cif_format import structure_to_model_cif
from crystallm_core.chem.judges.isolation import check_sample
from crystallm_core.chem.decoding.repair import relax, rescale
from crystallm_core.chem.judges.stability import RelaxSettings
from crystallm_core.product.run_files import run_zip


def generated(structure, volume_factor: float):
    structure.scale_lattice(structure.volume * volume_factor)
    return check_sample(structure_to_model_cif(structure), "eos", 0)[1]


@pytest.mark.parametrize("prototype, expected_factor", [(rocksalt_nacl, 1.117), (rutile_tio2, 1.206)])
def test_a_compressed_cell_is_rescaled_until_every_bond_fits(prototype, expected_factor):
    report = generated(prototype(), 0.62 ** 3)
    assert [c.name for c in report.checks if not c.passed] == ["bond_lengths"]
    repair = rescale(report.structure, report)
    assert repair.kind == "rescale" and repair.valid and repair.reasons == []
    assert repair.details["factor"] == pytest.approx(expected_factor, abs=0.01)
    assert check_sample(repair.cif, "eos", 0)[1].valid


def test_rescale_is_for_bond_only_failures():
    valid = generated(rocksalt_nacl(), 1.0)
    assert valid.valid and rescale(valid.structure, valid) is None
    apart = generated(rocksalt_nacl(), 1.35 ** 3)  # no bonds left to scale by
    repair = rescale(apart.structure, apart)
    assert not repair.valid and repair.reasons == ["no single scale fits every bond"]


def test_relaxation_reports_e_hull_before_and_after(monkeypatch):
    import pandas as pd

    from crystallm_core.chem.judges import stability
    from crystallm_core.chem.data.hull import HullReference

    monkeypatch.setattr(stability, "load_hull", lambda: HullReference(pd.DataFrame({
        "formula": ["Na", "Cl", "NaCl"], "e_form_per_atom": [0, 0, -2.1], "source_id": ["Na", "Cl", "nacl"]})))
    report = generated(rocksalt_nacl().get_primitive_structure(), 1.05)
    repair = relax(report.structure, report, RelaxSettings(max_steps=5, max_seconds=60))
    assert repair.kind == "relax" and repair.cif and {"e_hull_before", "e_hull_after", "steps"} <= set(repair.details)
    assert repair.details["steps"] <= 5


def test_repairs_are_counted_apart_and_land_in_the_table_and_zip():
    run = sample_run()
    invalid = run.candidates[3]
    invalid.repairs = [{"kind": "rescale", "valid": True, "cif": "data_x\n", "details": {"factor": 1.05},
                        "reasons": []}]
    frame = run.to_frame()
    assert not frame["valid"][3] and frame["valid_after_repair"][3]
    assert frame["repairs"][3] == "rescale ×1.050: valid"
    assert run.manifest()["n_valid"] == 3 and run.manifest()["n_valid_after_repair"] == 4
    with zipfile.ZipFile(io.BytesIO(run_zip(run))) as archive:
        assert archive.read("repaired/003_unparsed_rescale.cif") == b"data_x\n"
