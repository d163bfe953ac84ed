"""The pages' service layer: sweep requests, hit-rate curve, sweep summary, zips of stored runs."""
from __future__ import annotations

import io
import zipfile

import pandas as pd
import pytest
from prototypes import rocksalt_nacl
from run_samples import sample_run

from crystallm_core.chem.judges.structure_info import (
    describe_structure,
    parse_cif,
    xrd_pattern,
)
from crystallm_core.product.generation import GenerationRequest
from crystallm_core.product.history import HistoryStore
from crystallm_core.product.service import (
    e_hull_steering_note,
    hit_rate_vs_tolerance,
    response_table,
    run_table,
    space_group_choices,
    stored_run_zip,
    sweep_requests,
    sweep_summary,
    variant_samples,
)


def test_hit_curve_and_sweep_summary_over_all_samples():
    frame = run_table(sample_run())
    curve = hit_rate_vs_tolerance(frame, [0.1, 0.25, 1.0])
    assert curve["hit_rate"].tolist() == pytest.approx([0.0, 2 / 4, 3 / 4])
    # every score has ± 0.1: at 0.25 eV both hits (0.2 eV off) are uncertain, at 0.1 eV one miss could be a hit
    assert curve["certain_hit_rate"].tolist() == pytest.approx([0.0, 0.0, 3 / 4])
    assert curve["possible_hit_rate"].tolist() == pytest.approx([1 / 4, 2 / 4, 3 / 4])
    summary = sweep_summary(frame).set_index("target")
    assert summary.loc[1.0, "n"] == 3 and summary.loc[1.0, "mean_pred"] == pytest.approx(0.7)
    assert summary.loc[3.0, "hit"] == 1.0


def test_run_table_takes_the_pages_settings_over_the_runs():
    run = sample_run()
    assert run_table(run)["hit"].tolist()[:2] == [True, False]
    assert run_table(run, tolerance=1.0)["hit"].tolist()[:2] == [True, True]
    assert run_table(run, threshold=0.5)["stable"].tolist()[:2] == [True, True]


def test_sweep_requests_share_settings_and_differ_in_target_and_seed():
    base = GenerationRequest(band_gap=2.0, n=3, composition="TiO2", seed=7)
    requests = sweep_requests(base, 0.5, 2.0, 4, 5, fixed=0.1)
    assert [r.band_gap for r in requests] == [0.5, 1.0, 1.5, 2.0] and [r.seed for r in requests] == [7, 8, 9, 10]
    assert all(r.n == 5 and r.e_hull == 0.1 and r.composition is None for r in requests)
    with pytest.raises(ValueError, match="highest target must be above"):
        sweep_requests(base, 2.0, 1.0, 4, 5, fixed=0.0)


def test_best_of_sweep_draws_k_times_and_keeps_k_per_target():
    base = GenerationRequest(band_gap=2.0, n=64, keep_best=16, seed=7)  # the last Generate request's best-of
    requests = sweep_requests(base, 0.5, 2.0, 4, 5, fixed=0.1, best_of=4)
    assert all(r.n == 20 and r.keep_best == 5 for r in requests)
    assert all(r.n == 5 and r.keep_best is None for r in sweep_requests(base, 0.5, 2.0, 4, 5, fixed=0.1))


def test_e_hull_sweep_varies_e_hull_at_a_fixed_gap_and_summarises_its_estimates():
    base = GenerationRequest(band_gap=2.0, e_hull=0.3, n=3, seed=1)
    requests = sweep_requests(base, 0.0, 0.5, 3, 4, fixed=1.5, swept="e_hull")
    assert [r.e_hull for r in requests] == [0.0, 0.25, 0.5] and all(r.band_gap == 1.5 for r in requests)
    with pytest.raises(ValueError, match="one of band_gap, e_hull"):
        sweep_requests(base, 0.0, 0.5, 3, 4, fixed=1.5, swept="density")
    frame = pd.DataFrame({"e_hull_target": [0.0, 0.0, 0.5, 0.5], "valid": [True, True, True, False],
                          "e_hull_pred": [0.05, 0.3, 0.45, 0.5]})
    summary = sweep_summary(frame, "e_hull").set_index("target")
    assert summary.loc[0.0, "hit"] == 0.5 and summary.loc[0.0, "median_pred"] == pytest.approx(0.175)
    assert summary.loc[0.5, "hit"] == 0.5 and summary.loc[0.5, "mean_pred"] == pytest.approx(0.45)  # invalid: not counted


def test_zip_of_a_stored_run_and_of_one_deleted_meanwhile(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite")
    run = sample_run()
    store.save(run)
    with zipfile.ZipFile(io.BytesIO(stored_run_zip(store, run.run_id))) as archive:
        assert "cifs/002_TiO2.cif" in archive.namelist()
    store.delete(run.run_id)
    with zipfile.ZipFile(io.BytesIO(stored_run_zip(store, run.run_id))) as archive:
        assert archive.namelist() == ["RUN_DELETED.txt"] and b"was deleted" in archive.read("RUN_DELETED.txt")


def test_space_group_choices_cover_all_230_in_model_notation():
    choices = space_group_choices()
    assert [n for n, _ in choices] == list(range(1, 231))
    assert dict(choices)[14] == "P2_1/c" and dict(choices)[225] == "Fm-3m"


def test_parse_cif_reports_corrupt_input():
    from pymatgen.io.cif import CifWriter

    assert parse_cif(str(CifWriter(rocksalt_nacl()))).composition.reduced_formula == "NaCl"
    for bad in ("", "not a cif at all", "data_x\n_cell_length_a 5\n"):
        with pytest.raises(ValueError):
            parse_cif(bad)


def test_structure_description_and_xrd():
    summary = describe_structure(rocksalt_nacl())
    assert summary["space group"] == "Fm-3m (#225)" and summary["crystal system"] == "cubic"
    assert summary["density (g/cm³)"] == pytest.approx(2.164, abs=0.01)
    peaks = xrd_pattern(rocksalt_nacl())
    strongest = peaks.loc[peaks["intensity"].idxmax()]
    assert strongest["two_theta"] == pytest.approx(31.7, abs=0.1) and strongest["hkl"] == "(2 0 0)"


def test_response_curves_name_each_variants_own_sample_count():
    """A file merged from runs of different sizes: the note and the table quote each variant's own."""
    point = lambda target, median: {"target": target, "n": 96, "n_valid": 90, "median": [median, 0.0, 2.0],  # noqa: E731
                                    "within_tolerance": 0.1}
    sweep = {"points": [point(0.0, 1.1), point(0.5, 1.4)], "spearman": 0.2, "steers": True,
             "median_difference_low_minus_high": [-0.3, -0.5, -0.1]}
    settings = {"guidance_scale": 1.0, "guide": "all"}
    curves = {"samples_per_point": 24, "seed": 1, "tolerance": {"e_hull": 0.1, "band_gap": 0.5},
              "variants": {"default": {"settings": settings, "samples_per_point": 96, "e_hull_sweep": sweep},
                           "best-of-8": {"settings": settings, "best_of": 8, "e_hull_sweep": sweep}}}
    assert variant_samples(curves, "default") == 96 and variant_samples(curves, "best-of-8") == 24  # older: file's
    assert "96 samples per target" in e_hull_steering_note(curves)
    table = response_table(curves)
    assert table.groupby("variant")["samples per target"].first().to_dict() == {"best-of-8": 24, "default": 96}
