"""Band-gap readings of generated structures: the split, the agreement measures, perturbed training copies."""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
from prototypes import rocksalt_nacl, rutile_tio2

from crystallm_core.chem.judges.chgnet_features import ATOM_FEATURE_DIM, chgnet_feature_names
from crystallm_core.chem.judges.surrogates import train_head as train_head_module
from crystallm_core.chem.judges.surrogates.ensemble import EnsembleConfig, combine
from crystallm_core.chem.judges.surrogates.generated_gap import (
    CALIBRATION,
    HELD_OUT,
    agreement,
    paired_difference,
    spearman,
    split_halves,
)
from crystallm_core.chem.judges.surrogates.perturb import Perturbation, perturbed, perturbed_rows


def test_split_halves_is_fixed_and_balanced_per_target():
    targets = np.repeat([0.1, 1.5, 6.8], [10, 11, 40])
    halves = split_halves(targets, seed=3)
    assert np.array_equal(halves, split_halves(targets, seed=3)) and set(halves) == {CALIBRATION, HELD_OUT}
    for target, n in ((0.1, 10), (1.5, 11), (6.8, 40)):
        assert (halves[targets == target] == CALIBRATION).sum() == n // 2
    assert not np.array_equal(halves, split_halves(targets, seed=4))


def test_spearman_uses_average_ranks_for_tied_zeros():
    reference = np.array([0.0, 0.1, 0.5, 2.0, 3.0])
    assert spearman(reference ** 2, reference) == pytest.approx(1.0)
    tied = np.array([0.0, 0.0, 0.5, 2.0, 3.0])  # two metals read as exactly 0 eV
    assert spearman(tied, reference) == pytest.approx(np.corrcoef([1.5, 1.5, 3, 4, 5], [1, 2, 3, 4, 5])[0, 1])
    assert np.isnan(spearman(np.zeros(5), reference))


def test_agreement_and_paired_difference():
    rng = np.random.default_rng(0)
    reference = rng.uniform(0, 5, 300)
    good, poor = reference + rng.normal(0, 0.2, 300), reference + rng.normal(0, 1.5, 300)
    scores = agreement(good, reference, n_boot=200)
    assert scores["n"] == 300 and scores["spearman_ci"][0] <= scores["spearman"] <= scores["spearman_ci"][1]
    assert scores["mae_ci"][0] <= scores["mae"] <= scores["mae_ci"][1] and scores["mae"] == pytest.approx(0.16, abs=0.03)
    better = paired_difference(good, poor, reference, n_boot=200)
    assert better["d_spearman_ci"][0] > 0 and better["d_mae_ci"][1] < 0  # clearly better: intervals exclude 0
    same = paired_difference(good, good, reference, n_boot=50)
    assert same["d_spearman"] == 0 and same["d_mae_ci"] == [0, 0]


def test_perturbed_copy_keeps_species_and_moves_cell_and_atoms_a_little():
    structure = rutile_tio2()
    copy = perturbed(structure, np.random.default_rng(0), Perturbation(strain=0.03, jitter=0.05))
    assert [s.symbol for s in copy.species] == [s.symbol for s in structure.species]
    assert copy.volume != pytest.approx(structure.volume, rel=1e-4)
    assert abs(copy.volume / structure.volume - 1) < 0.25
    shift = np.linalg.norm(copy.cart_coords - structure.cart_coords, axis=1)  # strain and jitter together
    assert 0 < shift.max() < 1.0
    unchanged = perturbed(structure, np.random.default_rng(0), Perturbation(strain=0.0, jitter=0.0))
    assert np.allclose(unchanged.cart_coords, structure.cart_coords) and unchanged.volume == pytest.approx(structure.volume)


def test_perturbed_rows_are_reproducible_per_row_and_copy():
    table = pd.DataFrame({"id": ["a", "b"], "cif": [rocksalt_nacl().to(fmt="cif"), rutile_tio2().to(fmt="cif")],
                          "band_gap": [5.0, 1.8], "split": "train"})
    two = perturbed_rows(table, 2)
    assert two.id.tolist() == ["a~0", "a~1", "b~0", "b~1"] and two.band_gap.tolist() == [5.0, 5.0, 1.8, 1.8]
    one = perturbed_rows(table, 1)
    assert one.cif.tolist() == two.cif.iloc[[0, 2]].tolist()  # asking for more copies keeps the first ones
    assert two.cif.iloc[0] != two.cif.iloc[1]


def test_train_head_augment_appends_perturbed_train_rows_only(tmp_path, monkeypatch):
    table = pd.DataFrame({"id": ["t1", "v1", "t2"], "source": ["mp20", "wbm", "wbm"], "split": ["train", "val", "train"],
                          "band_gap": [0.0, 1.0, 2.0],
                          "cif": [rocksalt_nacl().to(fmt="cif"), rocksalt_nacl().to(fmt="cif"), rutile_tio2().to(fmt="cif")]})
    width = len(chgnet_feature_names())
    seen = {}

    def fake_features(rows, cache):
        seen.update(ids=rows.id.tolist(), cache=cache.name)
        crystal = np.ones((len(rows), width))
        crystal[1] = np.nan  # a copy CHGNet could not read is dropped
        return crystal, [np.ones((2, ATOM_FEATURE_DIM))] * len(rows)

    monkeypatch.setattr(train_head_module, "cached_chgnet_features", fake_features)
    args = argparse.Namespace(augment=1, strain=0.03, jitter=0.1, chgnet_cache=tmp_path / "chgnet_features.npz")
    out, crystal, atoms = train_head_module.augmented(table, np.zeros((3, width)), [np.zeros((1, ATOM_FEATURE_DIM))] * 3,
                                                      args)
    assert seen == {"ids": ["t1~0", "t2~0"], "cache": "chgnet_perturbed_s0.03_j0.1.npz"}
    assert out.id.tolist() == ["t1", "v1", "t2", "t1~0"] and out.split.tolist() == ["train", "val", "train", "train"]
    assert out.band_gap.tolist() == [0.0, 1.0, 2.0, 0.0] and crystal.shape == (4, width) and len(atoms) == 4


def test_train_head_command_runs_on_chgnet_features_alone_and_with_perturbed_copies(tmp_path, monkeypatch):
    """The default variant reads no descriptors: every row must still count as featurised."""
    import json

    from prototypes import all_prototypes
    from test_surrogates import tiny_ensemble

    from crystallm_core.chem.judges.surrogates.ensemble import EnsembleConfig

    structures = list(all_prototypes().items())
    rows = [{"id": f"r{i}", "source": "wbm" if i % 2 else "mp20", "band_gap": float(i % 3 > 0) * (1.0 + i % 5),
             "split": "val" if i % 4 == 0 else "train", "cif": s.to(fmt="cif"), "reduced_formula": name}
            for i, (name, s) in enumerate(structures * 2)]
    pd.DataFrame(rows).to_parquet(tmp_path / "dataset.parquet")
    models = tiny_ensemble(tmp_path / "models", EnsembleConfig(["head"]))
    width, rng = len(chgnet_feature_names()), np.random.default_rng(0)

    def fake_features(table, cache, verbose=True):
        return rng.normal(size=(len(table), width)), [rng.normal(size=(2, ATOM_FEATURE_DIM)) for _ in range(len(table))]

    monkeypatch.setattr(train_head_module, "cached_chgnet_features", fake_features)
    monkeypatch.setattr(train_head_module, "calibrate_on_rows",  # (its own tests); a random head reads all as metals
                        lambda args, members, *rest: (EnsembleConfig(members), {}))
    full_size = train_head_module.HeadConfig
    monkeypatch.setattr(train_head_module, "HeadConfig",  # a small head: only the command's plumbing is under test
                        lambda n_inputs, n_atom_inputs, descriptors: full_size(n_inputs, n_atom_inputs, descriptors,
                                                                               hidden=16, n_models=2))
    for extra in ([], ["--augment", "1"]):
        train_head_module.main(["--dataset", str(tmp_path / "dataset.parquet"), "--out", str(models), "--epochs", "1",
                                "--calibrate-on", "val", "--chgnet-cache", str(tmp_path / "c.npz"), *extra])
        log = json.loads((models / "head_metrics.json").read_text())
        assert log["rows"] == len(rows) and log["failed_rows"] == 0
        n_train = sum(r["split"] == "train" for r in rows)
        assert log["augment"]["rows"] == (n_train if extra else 0)


def script(name: str):
    """A module of scripts/ (they run from a checkout, not installed)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_choose_gap_blend_gives_v1_its_shares_half_each():
    module = script("choose_gap_blend")
    p_metal = np.array([[0.55, 0.0, 0.2]])
    gap = np.array([[3.0, 5.0, 7.0]])
    reading, p = module.blend(p_metal, gap, metal_share=0.2, gap_share=0.0)
    assert p == pytest.approx([0.8 * 0.55 + 0.1 * 0.2]) and reading == pytest.approx(np.sqrt(1 - p) * 3.0)
    alone, p_alone = module.blend(p_metal, gap, 0.0, 0.0)
    assert p_alone == pytest.approx([0.55]) and alone == pytest.approx([0.0])  # the head alone calls it a metal
    p_more = 0.6 * 0.55 + 0.2 * 0.2
    assert module.blend(p_metal, gap, 0.4, 0.3)[0] == pytest.approx(np.sqrt(1 - p_more) * (0.7 * 3 + 0.15 * 12))


def test_charge_balance_sorts_compositions_as_dft_would_read_them():
    module = script("measure_generated_gap")
    assert module.charge_balanced("Na1 Cl1") == "balanced" and module.charge_balanced("Ba4 Ti4 O12") == "balanced"
    assert module.charge_balanced("Na2 Li1 F4") == "not balanced"  # one electron short: a hole in the F p band
    assert module.charge_balanced("Cu4") == "other" and module.charge_balanced("not a formula") == "other"
    cif = "data_x\n_chemical_formula_sum   'Na2 Li1 F4'\n_cell_length_a 4.0\n"
    assert module.formula_of(cif) == "Na2 Li1 F4" and module.formula_of("data_x\n") == ""


def test_choose_gap_gate_rescales_the_spread_on_rows_read_as_non_metals():
    module = script("choose_gap_gate")
    rng = np.random.default_rng(0)
    n = 400
    table = pd.DataFrame({"label": rng.uniform(0.5, 4, n), "split": "val", "force_rms": 0.05, "stress_max": 0.1})
    for member in module.MEMBERS:
        table[f"{member}_p_metal"] = np.where(np.arange(n) < 100, 0.99, 0.05)  # a quarter read as metals
        table[f"{member}_gap"] = table.label + rng.normal(0, 0.5, n)
        table[f"{member}_gap_var"] = 0.0
    rows = module.Rows(table)
    config = EnsembleConfig(module.MEMBERS, "mixture", 0.0, 0.2, 3.0, metal_threshold=0.9, gap_exponent=1.0)
    rescaled = module.rescaled(config, [rows])
    assert rescaled.scale != 3.0 and rescaled.metal_threshold == 0.9
    mean, spread, _, _ = combine(rows.p_metal, rows.gap, rescaled, rows.gap_var)
    read_gap = mean > 0
    assert read_gap.sum() == 300
    assert np.mean(np.abs(mean - rows.label)[read_gap] <= spread[read_gap]) == pytest.approx(0.68, abs=0.01)


def test_choose_gap_gate_reads_perturbed_copies_of_the_dft_rows_against_their_own_gap(tmp_path):
    """The perturbed rows keep their structure's DFT gap and split, move every atom, and are the
    same on every run (their readings are cached and compared across gates)."""
    from pymatgen.core import Structure

    module = script("choose_gap_gate")
    salt, potash, lime = rocksalt_nacl(), rocksalt_nacl(), rocksalt_nacl()
    potash.replace_species({"Na": "K", "Cl": "Br"})  # KBr: test split; NaCl and CaO: val
    lime.replace_species({"Na": "Ca", "Cl": "O"})
    for folder in ("extra", "wbm", "mp20"):
        (tmp_path / folder).mkdir()
    pd.DataFrame({"id": ["g0", "g1"], "cif": [salt.to(fmt="cif")] * 2, "target_band_gap": [1.0, 3.0],
                  "target_e_hull": 0.0, "is_valid": True, "alignn_band_gap": [4.1, 4.3]}).to_csv(
        tmp_path / "extra/crystallm_pi_generated_dev.csv.gz", index=False)
    pd.DataFrame({"wbm_row": [0, 1], "cif": [salt.to(fmt="cif"), potash.to(fmt="cif")],
                  "formation_energy_per_atom": -2.0, "band_gap": [5.0, 4.0]}).to_csv(tmp_path / "wbm/wbm_val_dev.csv.gz",
                                                                                    index=False)
    pd.DataFrame({"material_id": ["mp-1"], "pretty_formula": ["CaO"], "band_gap": [3.6], "cif": [lime.to(fmt="cif")]}
                 ).to_csv(tmp_path / "mp20/mp_20_x.csv.gz", index=False)
    rows = module.labelled_rows(tmp_path)
    again = module.labelled_rows(tmp_path)
    assert set(rows) == set(module.SOURCES)
    for level in module.PERTURBATIONS:
        for source in ("wbm", "mp"):
            copy, original = rows[f"{source}_{level}"], rows[source]
            assert copy.label.tolist() == original.label.tolist() and copy.split.tolist() == original.split.tolist()
            assert copy.cif.tolist() == again[f"{source}_{level}"].cif.tolist()
            for before, after in zip(original.cif, copy.cif):
                before, after = Structure.from_str(before, fmt="cif"), Structure.from_str(after, fmt="cif")
                assert before.composition == after.composition
                moved = np.linalg.norm(before.cart_coords - after.cart_coords, axis=1)
                assert (moved > 1e-3).all()
    assert rows["wbm"].split.tolist() == ["val", "test"] and rows["mp"].split.tolist() == ["val"]
