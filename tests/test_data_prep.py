"""prepare-data end to end on a tiny fake data directory built from pymatgen prototypes."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from prototypes import all_prototypes
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from crystallm_core.chem.data import data_prep, hull
from crystallm_core.lm.conditions import normalise_band_gap, normalise_e_hull
from crystallm_core.lm.tokenizer import get_tokenizer

ELEMENTS = ["Na", "Cl", "Si", "Ti", "O", "Sr", "Zn", "Cu", "Po"]  # no Ge: its hull is unknown


def cif(structure: Structure) -> str:
    return str(CifWriter(structure))  # P1, all sites, like the MP CSVs


def long_p1_cell() -> Structure:
    """108 Cu atoms shaken out of symmetry: a P1 CIF far over 1024 tokens."""
    structure = all_prototypes()["Cu"].make_supercell([3, 3, 3])
    structure.perturb(0.3, min_distance=0.2, seed=0)
    return structure


def make_data_dir(root):
    """Fake shared-data folder with the real files' names and columns."""
    p = all_prototypes()
    for folder in ["mp20", "mpts52", "wbm", "labels", "references"]:
        (root / folder).mkdir(parents=True)
    mp20 = pd.DataFrame({
        "material_id": ["mp-1", "mp-2", "mp-3", "mp-4"],
        "formation_energy_per_atom": [-2.0, -3.5, 0.0, -3.3],
        "band_gap": [5.0, 1.8, 0.6, 1.9],
        "pretty_formula": ["NaCl", "TiO2", "Si", "SrTiO3"],
        "e_above_hull": [0.0, 0.0, 0.0, 0.01],
        "elements": ["['Na', 'Cl']", "['Ti', 'O']", "['Si']", "['Sr', 'Ti', 'O']"],
        "cif": [cif(p["NaCl"]), cif(p["TiO2"]), cif(p["Si"]), cif(p["SrTiO3"])],
        "spacegroup.number": [225, 136, 227, 221],
    })
    mp20.to_csv(root / "mp20" / "mp_20_biternary__test.csv.gz", index=False)
    mpts = pd.DataFrame({
        "material_id": ["mp-2", "mp-5", "mp-6", "mp-7", "mp-8", "mp-9"],
        "theoretical": False,
        "energy_above_hull": [0.0, 0.0, 0.0, 0.0, 0.2, 0.3],
        "formation_energy_per_atom": [-3.5, -1.8, 0.0, -2.0, -1.0, 0.05],
        "year": 2000,
        # mp-2: same id as an MP-20 row; mp-7: the NaCl structure again; mp-8: broken CIF
        "cif": [cif(p["TiO2"]), cif(p["ZnO"]), cif(p["Cu"]), cif(p["NaCl"]), "data_broken\n_cell_length_a 1\n",
                cif(long_p1_cell())],
    })
    mpts.to_csv(root / "mpts52" / "mpts_52__test.csv.gz", index=False)
    strained_zno = p["ZnO"].copy()
    strained_zno.scale_lattice(strained_zno.volume * 1.2)
    germanium = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.66), ["Ge"], [[0, 0, 0]])
    polonium = Structure(Lattice.cubic(3.35), ["Po"], [[0, 0, 0]])
    wbm = pd.DataFrame({
        "wbm_row": [0, 1, 2, 3],
        "cif": [cif(strained_zno), cif(p["NaCl"].copy().scale_lattice(p["NaCl"].volume * 1.3)), cif(germanium),
                cif(polonium)],
        "formation_energy_per_atom": [-1.5, -2.5, 0.1, 0.0],
        "band_gap": [2.0, 4.0, 0.5, 0.0],
    })
    wbm.to_csv(root / "wbm" / "wbm_val_dev.csv.gz", index=False)
    labels = pd.DataFrame({
        "material_id": ["mp-1", "mp-5"],
        "pretty_formula": ["NaCl", "ZnO"],
        "species_at_sites": [["Na", "Cl"], ["Zn", "Zn", "O", "O"]],
        "e_above_hull": [0.0, 0.0],
        "formation_energy_per_atom": [-2.0, -1.8],
        "band_gap": [5.0, 3.3],
    })
    labels.to_parquet(root / "labels" / "mp20_hulls_mace_above_hull_dataset.parquet")
    references = {el: {"@module": "pymatgen.entries.computed_entries", "@class": "ComputedEntry",
                       "energy": -1.0, "composition": {el: 1.0}, "entry_id": f"mp-{el}-GGA",
                       "data": {"material_id": f"mp-{el}"}} for el in ELEMENTS}
    (root / hull.ELEMENT_REFERENCES).write_text(json.dumps(references))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = make_data_dir(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("cache")
    parser = data_prep.argparse.ArgumentParser()
    data_prep.add_arguments(parser)
    assert data_prep.run(parser.parse_args(["--data-dir", str(root), "--out", str(out), "--workers", "2"])) == 0
    return root, out


def test_rows_kept_and_rejected_with_reasons(prepared):
    _, out = prepared
    table = pd.read_parquet(out / "dataset.parquet")
    assert list(table["id"]) == ["mp-1", "mp-2", "mp-3", "mp-4", "mp-5", "mp-6", "wbm-0", "wbm-1", "wbm-2"]
    rejected = pd.read_csv(out / "rejected.csv").set_index("id")["reason"]
    assert rejected["mp-7"].startswith("duplicate")
    assert rejected["mp-8"].startswith("conversion failed")
    assert rejected["mp-9"].startswith("too long")
    assert rejected["wbm-3"].startswith("unknown element: Po")  # Po is not in the vocabulary
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sources_done"] == ["mp20", "mpts52", "wbm"]
    assert summary["rows_kept_by_source"] == {"mp20": 4, "mpts52": 2, "wbm": 3}
    assert summary["e_hull_not_computable"] == 1


def test_properties_and_missing_values(prepared):
    _, out = prepared
    table = pd.read_parquet(out / "dataset.parquet").set_index("id")
    assert table.loc["mp-5", "band_gap"] == 3.3  # from the labels parquet
    assert np.isnan(table.loc["mp-6", "band_gap"])
    assert table.loc["wbm-0", "e_hull"] > 0  # strained ZnO above the ZnO entry
    assert table.loc["wbm-1", "e_hull"] == pytest.approx(-0.5)  # below the NaCl entry, kept raw
    assert np.isnan(table.loc["wbm-2", "e_hull"])  # Ge has no reference state
    assert table.loc["mp-2", ["reduced_formula", "spacegroup_number", "n_atoms"]].tolist() == ["TiO2", 136, 6]
    assert table["cif"].str.contains("_cell_length_a").all()


def test_split_is_formula_disjoint_and_matches_splits_csv(prepared):
    _, out = prepared
    table = pd.read_parquet(out / "dataset.parquet")
    assert (table.groupby("reduced_formula")["split"].nunique() == 1).all()
    splits = pd.read_csv(out / "splits.csv")
    assert list(splits.columns) == ["id", "reduced_formula", "split"]
    assert splits["split"].tolist() == table["split"].tolist()


def test_token_npz_matches_table(prepared):
    _, out = prepared
    table = pd.read_parquet(out / "dataset.parquet")
    arrays = np.load(out / "tokens.npz")  # no pickle needed
    n = len(table)
    assert arrays["tokens"].dtype == np.uint16 and arrays["offsets"].shape == (n + 1,)
    assert arrays["conditions"].dtype == np.float32 and arrays["conditions"].shape == (n, 2)
    assert arrays["present"].dtype == bool and arrays["present"].shape == (n, 2)
    assert arrays["split"].dtype == np.int8 and list(arrays["ids"]) == list(table["id"])
    assert np.array_equal(np.diff(arrays["offsets"]), table["n_tokens"].to_numpy())
    assert arrays["split"].tolist() == table["split"].map({"train": 0, "val": 1, "test": 2}).tolist()
    tokenizer = get_tokenizer()
    first = arrays["tokens"][arrays["offsets"][0]:arrays["offsets"][1]]
    assert first[0] == tokenizer.bos_id and first[-1] == tokenizer.eos_id
    assert "data_Na4Cl4" in tokenizer.decode(first)
    rows = {i: k for k, i in enumerate(arrays["ids"])}
    present, conditions = arrays["present"], arrays["conditions"]
    assert present[rows["mp-6"]].tolist() == [False, True] and conditions[rows["mp-6"], 0] == 0.0
    assert present[rows["wbm-2"]].tolist() == [True, False]
    assert conditions[rows["mp-1"]] == pytest.approx([normalise_band_gap(5.0), normalise_e_hull(0.0)])
    assert conditions[rows["wbm-1"], 1] == 0.0  # below the hull: clipped for the condition
    assert conditions[rows["mp-4"], 1] == pytest.approx(normalise_e_hull(0.01))


def test_limit_samples_per_source_and_bad_arguments(prepared, tmp_path):
    root, _ = prepared
    assert data_prep.main(["--data-dir", str(root), "--out", str(tmp_path), "--limit", "1", "--workers", "1"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["rows_in_by_source"] == {"mp20": 1, "mpts52": 1, "wbm": 1}
    assert data_prep.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert data_prep.main(["--data-dir", str(root), "--workers", "0"]) == 2


def test_hull_from_fake_data_dir(prepared, tmp_path):
    root, _ = prepared
    full = hull.HullReference.from_data_dir(root, vertices_only=False)
    assert len(full.table) == len(ELEMENTS) + 4  # NaCl TiO2 SrTiO3 ZnO; the broken CIF is skipped
    assert hull.main(["--data-dir", str(root), "--out", str(tmp_path / "h.csv.gz")]) == 0
    vertices = hull.HullReference.load(tmp_path / "h.csv.gz")
    assert vertices.e_above_hull("NaCl", -2.0) == pytest.approx(0.0, abs=1e-9)
    assert vertices.e_above_hull("ZnO", -1.5) == pytest.approx(0.3)


def test_conversion_shows_a_progress_bar_on_stderr(capsys):
    rows = pd.DataFrame({column: [None] * 3 for column in data_prep.ROW_COLUMNS})
    assert data_prep.process_rows(rows, lambda records: ({"n": i} for i, _ in enumerate(records))) == [
        {"n": 0}, {"n": 1}, {"n": 2}]
    assert "converting CIFs: 100%" in capsys.readouterr().err


def test_align_runs_relabelled_samples_join_the_train_split_only(prepared, tmp_path):
    root, _ = prepared
    from crystallm_core.chem.data.splits import split_of
    structures = list(all_prototypes().values())
    for structure in structures:  # not duplicates of the fake Materials Project rows
        structure.scale_lattice(structure.volume * 1.3)
    formulas = [s.composition.reduced_formula for s in structures]
    round_dir = tmp_path / "run" / "round_000"
    round_dir.mkdir(parents=True)
    pd.DataFrame({"id": [f"run-r0-{i}" for i in range(len(structures))], "formula": formulas,
                  "cif": [cif(s) for s in structures], "band_gap": 1.25, "e_hull": 0.75, "e_form": -1.0,
                  "signal": "hindsight"}).to_csv(round_dir / data_prep.RELABELLED_FILE, index=False)
    out = tmp_path / "out"
    assert data_prep.main(["--data-dir", str(root), "--out", str(out), "--workers", "1",
                           "--align-runs", str(tmp_path / "run")]) == 0
    table = pd.read_parquet(out / "dataset.parquet")
    aligned = table[table["source"] == "align"]
    in_train = {f for f in formulas if split_of(f) == "train"}
    assert len(aligned) and set(aligned["split"]) == {"train"} and set(aligned["reduced_formula"]) <= in_train
    assert aligned["e_hull"].eq(0.75).all() and aligned["band_gap"].eq(1.25).all()  # the readings are the labels
