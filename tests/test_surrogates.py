"""Band-gap surrogates: featurisation, graph network, LightGBM wrapper, ensemble, shipped models."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import lightgbm as lgb
import numpy as np
import pytest
import torch
from prototypes import all_prototypes, fcc_cu, rocksalt_nacl
from pymatgen.core import Lattice, Structure

from crystallm_core.chem.judges import stability
from crystallm_core.chem.judges.chgnet_features import ATOM_FEATURE_DIM, chgnet_feature_names
from crystallm_core.chem.judges.surrogates import report
from crystallm_core.chem.judges.surrogates.calibration import (
    coverage,
    fit_scale,
    mixture_spread,
    reliability_curve,
)
from crystallm_core.chem.judges.surrogates.cgcnn import (
    CrystalGNN,
    GNNConfig,
    GraphStore,
    load_gnn,
    predict_gap,
    save_gnn,
    standardise,
)
from crystallm_core.chem.judges.surrogates.ensemble import (
    BandGapSurrogate,
    EnsembleConfig,
    GapPrediction,
    combine,
)
from crystallm_core.chem.judges.surrogates.features import (
    ELEMENT_PROPERTIES,
    MAX_Z,
    element_table,
    feature_names,
    structure_features,
)
from crystallm_core.chem.judges.surrogates.gbm import GBMModel
from crystallm_core.chem.judges.surrogates.graphs import (
    GraphConfig,
    pack_graphs,
    structure_to_graph,
)
from crystallm_core.chem.judges.surrogates.head import (
    GapHead,
    HeadConfig,
    load_head,
    save_head,
)
from crystallm_core.chem.judges.surrogates.scoring import gap_metrics, gated_gap
from crystallm_core.chem.judges.surrogates.train_gnn import TrainConfig, train
from crystallm_core.chem.judges.surrogates.train_head import calibrate, train_head
from crystallm_core.paths import SURROGATE_DIR


@pytest.fixture(scope="module")
def prototypes() -> dict[str, Structure]:
    return all_prototypes()


def tiny_gnn() -> CrystalGNN:
    torch.manual_seed(0)
    config = GNNConfig(hidden=16, n_layers=2, n_rbf=8)
    return CrystalGNN(config, torch.as_tensor(standardise(element_table()))).eval()


def tiny_gbm() -> GBMModel:
    """Boosters fitted on random rows: only the plumbing is under test."""
    names = feature_names()
    rng = np.random.default_rng(0)
    features, target = rng.normal(size=(40, len(names))), rng.uniform(0, 3, 40)
    params = {"verbose": -1, "min_data_in_leaf": 2, "num_leaves": 4, "num_threads": 1}
    classifier = lgb.train({**params, "objective": "binary"}, lgb.Dataset(features, target > 1.5, feature_name=names), 3)
    regressor = lgb.train({**params, "objective": "l2"}, lgb.Dataset(features, target, feature_name=names), 3)
    return GBMModel(classifier, regressor)


def test_element_table_is_finite_and_complete():
    table = element_table()
    assert table.shape == (MAX_Z + 1, len(ELEMENT_PROPERTIES))
    assert np.isfinite(table).all()
    assert table[11, ELEMENT_PROPERTIES.index("valence_s")] == 1  # Na: [Ne].3s1


def test_structure_features_have_one_finite_value_per_name(prototypes):
    for name, structure in prototypes.items():
        vector = structure_features(structure)
        assert vector.shape == (len(feature_names()),), name
        assert np.isfinite(vector).all(), name
    nacl = dict(zip(feature_names(), structure_features(prototypes["NaCl"])))
    assert nacl["spacegroup_number"] == 225 and nacl["n_elements"] == 2
    assert nacl["coordination_mean"] == 6 and nacl["nn_distance_min"] == pytest.approx(2.82, abs=1e-3)


def test_disordered_structure_is_rejected_with_a_reason():
    alloy = Structure(Lattice.cubic(3.6), [{"Cu": 0.5, "Au": 0.5}], [[0, 0, 0]])
    with pytest.raises(ValueError, match="disordered"):
        structure_features(alloy)
    with pytest.raises(ValueError, match="disordered"):
        structure_to_graph(alloy)


def test_graphs_keep_the_nearest_neighbours(prototypes):
    config = GraphConfig(cutoff=8.0, max_neighbors=12)
    for name, structure in prototypes.items():
        graph = structure_to_graph(structure, config)
        incoming = np.bincount(graph.dst, minlength=len(structure))
        assert (incoming == config.max_neighbors).all(), name  # 8 Å always holds 12 neighbours here
        assert graph.distances.max() <= config.cutoff
    cu = structure_to_graph(prototypes["Cu"], config)
    assert cu.distances == pytest.approx(np.full(len(cu.src), 3.615 / math.sqrt(2)), abs=1e-4)  # fcc: 12 at a/√2


def test_graph_store_batches_are_disjoint_unions(prototypes):
    graphs = [structure_to_graph(prototypes[name]) for name in ("NaCl", "Cu", "TiO2")]
    store = GraphStore(pack_graphs(graphs))
    batch = store.batch(torch.tensor([2, 1]))
    n_tio2, n_cu = len(graphs[2].atomic_numbers), len(graphs[1].atomic_numbers)
    assert batch.n_graphs == 2 and batch.graph_index.tolist() == [0] * n_tio2 + [1] * n_cu
    assert batch.atomic_numbers.tolist() == graphs[2].atomic_numbers.tolist() + [29] * n_cu
    cu_edges = batch.src[len(graphs[2].src):]
    assert cu_edges.tolist() == (graphs[1].src + n_tio2).tolist()  # local ids shifted past TiO2


def test_gnn_prediction_does_not_depend_on_batch_company(prototypes):
    model = tiny_gnn()
    store = GraphStore(pack_graphs([structure_to_graph(s) for s in prototypes.values()]))
    p_all, gap_all = predict_gap(model, store, np.arange(len(store)))
    p_one, gap_one = predict_gap(model, store, np.array([3]))
    assert p_all.shape == gap_all.shape == (len(prototypes),)
    assert ((p_all >= 0) & (p_all <= 1)).all() and (gap_all >= 0).all()
    assert p_one[0] == pytest.approx(p_all[3], abs=1e-5) and gap_one[0] == pytest.approx(gap_all[3], abs=1e-5)


def test_gnn_save_load_round_trip(tmp_path, prototypes):
    model = tiny_gnn()
    save_gnn(model, tmp_path)
    loaded = load_gnn(tmp_path)
    assert loaded.config == model.config
    store = GraphStore(pack_graphs([structure_to_graph(prototypes["ZnO"])]))
    for a, b in zip(predict_gap(model, store, np.arange(1)), predict_gap(loaded, store, np.arange(1))):
        assert a == pytest.approx(b, abs=1e-6)


def test_train_gnn_runs_and_keeps_a_model(prototypes):
    graphs = [structure_to_graph(s) for s in prototypes.values()]
    arrays = pack_graphs(graphs * 2)
    arrays.update(band_gap=np.array([5.0, 1.1, 3.0, 3.2, 3.4, 0.0] * 2, np.float32),
                  split=np.array(["train"] * 6 + ["val"] * 6), source=np.array(["mp20"] * 12),
                  element_features=element_table())
    tiny = GNNConfig(hidden=8, n_layers=1, n_rbf=4)
    model, log = train(arrays, tiny, TrainConfig(time_budget_s=30, max_epochs=3), "cpu")
    assert len(log) == 3 and all(np.isfinite(entry["val_mae"]) for entry in log)
    assert isinstance(model, CrystalGNN)


def test_train_gnn_does_not_import_pymatgen():
    # The GPU training machine has torch and numpy but no pymatgen.
    code = ("import sys, crystallm_core.chem.judges.surrogates.train_gnn; "
            "sys.exit(any(m.split('.')[0] in ('pymatgen', 'pandas', 'lightgbm') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_gating_and_metrics():
    assert gated_gap([0.9, 0.19, 0.0], [3.0, 2.0, -1.0]).tolist() == pytest.approx([0.0, 1.8, 0.0])
    # the mixture's mean, 0 eV only for confident metal calls (the shipped form since v4.3)
    assert gated_gap([0.7, 0.9, 0.2], [3.0, 3.0, 2.0], threshold=0.9, exponent=1.0) == pytest.approx([0.9, 0.0, 1.6])
    metrics = gap_metrics(np.array([0.0, 2.0, 4.0]), np.array([0.0, 2.0, 3.0]), np.array([0.9, 0.1, 0.1]))
    assert metrics["mae"] == pytest.approx(1 / 3) and metrics["mae_gap_pos"] == pytest.approx(0.5)
    assert metrics["metal_accuracy"] == 1.0 and metrics["n_gap_pos"] == 2


def test_v1_ensemble_turns_bad_structures_into_reasons(tmp_path):
    tiny_gnn_dir = tmp_path / "models"
    save_gnn(tiny_gnn(), tiny_gnn_dir)
    tiny_gbm().save(tiny_gnn_dir)
    surrogate = BandGapSurrogate.load(tiny_gnn_dir)
    disordered = Structure(Lattice.cubic(3.6), [{"Cu": 0.5, "Au": 0.5}], [[0, 0, 0]])
    predictions = surrogate.predict([rocksalt_nacl(), "not a structure", disordered, fcc_cu()])
    assert len(predictions) == 4 and all(isinstance(p, GapPrediction) for p in predictions)
    for good in (predictions[0], predictions[3]):
        assert good.reason is None and all(np.isfinite([good.gnn, good.gbm, good.mean, good.std, good.p_metal]))
        assert good.std == pytest.approx(abs(good.gnn - good.gbm) / 2)
    for bad, words in ((predictions[1], "pymatgen Structure"), (predictions[2], "disordered")):
        assert words in bad.reason and math.isnan(bad.mean) and math.isnan(bad.gnn)
    assert surrogate.predict([]) == []
    assert math.isnan(surrogate.predict(["x"])[0].mean)


def tiny_ensemble(directory, config: EnsembleConfig):
    save_gnn(tiny_gnn(), directory)
    tiny_gbm().save(directory)
    torch.manual_seed(0)
    save_head(GapHead(HeadConfig(len(chgnet_feature_names()), ATOM_FEATURE_DIM, hidden=16, n_models=3)), directory)
    config.save(directory)
    return directory


def test_head_reuses_chgnet_features_and_computes_them_when_missing(tmp_path, monkeypatch):
    models = tiny_ensemble(tmp_path, EnsembleConfig(["head", "gbm"], "mixture", 0.1, 0.1, 1.5))
    surrogate = BandGapSurrogate.load(models)
    assert set(surrogate.models) == {"head", "gbm"} and surrogate.graph_config is None  # no graph network loaded
    structures = [rocksalt_nacl(), fcc_cu()]
    [nacl_features, cu_features] = [r.features for r in stability.static_readings(structures)]
    computed = surrogate.predict(structures)

    def no_second_chgnet_call(structures, batch_size=16):
        raise AssertionError("CHGNet must not run again when its features are given")

    monkeypatch.setattr("crystallm_core.chem.judges.surrogates.ensemble.static_readings", no_second_chgnet_call)
    reused = surrogate.predict(structures, chgnet=[nacl_features, cu_features])
    for a, b in zip(computed, reused):
        assert (a.mean, a.std, a.head, a.gbm) == pytest.approx((b.mean, b.std, b.head, b.gbm), abs=1e-6)
        assert math.isnan(a.gnn) and a.std > 0 and a.reason is None


def test_report_scores_v1_and_shipped_side_by_side(tmp_path, prototypes):
    import pandas as pd

    models = tiny_ensemble(tmp_path / "models", EnsembleConfig(["head", "gnn", "gbm"], "mixture", 0.1, 0.1, 1.0))
    rows = [("nacl", "mp20", 5.0, "test", "NaCl"), ("cu", "wbm", 0.0, "test", "Cu"),
            ("zno", "wbm", 3.4, "test", "ZnO"), ("tio2", "mp20", 3.0, "val", "TiO2"),
            ("si", "mp20", 1.1, "train", "Si"), ("srtio3", "mp20", float("nan"), "test", "SrTiO3")]
    pd.DataFrame([{"id": i, "source": source, "band_gap": gap, "split": split, "cif": prototypes[name].to(fmt="cif")}
                  for i, source, gap, split, name in rows]).to_parquet(tmp_path / "dataset.parquet")
    summary = report.main(["--dataset", str(tmp_path / "dataset.parquet"), "--models", str(models),
                           "--out", str(tmp_path / "metrics.json"), "--predictions", str(tmp_path / "predictions.csv")])
    assert set(summary["metrics"]) == {"v1", "shipped"}
    shipped = summary["metrics"]["shipped"]
    written = json.loads((tmp_path / "metrics.json").read_text())["metrics"]["shipped"]["test_wbm"]
    assert written["mae"] == shipped["test_wbm"]["mae"] and written["coverage_1"] == shipped["test_wbm"]["coverage_1"]
    assert set(shipped) == {"test_wbm", "test_mp", "val_mp"} and shipped["test_wbm"]["n"] == 2
    assert {"r2", "mae", "mae_gap_pos", "metal_accuracy", "coverage_1", "coverage_2"} <= set(shipped["test_mp"])
    assert summary["shipped_ms_per_structure_beyond_chgnet"] > 0 and summary["chgnet_ms_per_structure"] > 0
    table = pd.read_csv(tmp_path / "predictions.csv")
    assert table["id"].tolist() == ["nacl", "cu", "zno"] and (table["split"] == "test").all()  # labelled test rows
    assert {"true", "pred", "std", "p_metal", "head", "gnn", "gbm", "v1_pred", "v1_std"} <= set(table.columns)
    assert table["v1_std"].to_numpy() == pytest.approx(abs(table["gnn"] - table["gbm"]).to_numpy() / 2, abs=2e-4)
    wbm = table[table["source"] == "wbm"]
    assert np.mean(np.abs(wbm["true"] - wbm["pred"])) == pytest.approx(shipped["test_wbm"]["mae"], abs=1e-3)


def test_report_scores_a_previous_release_in_the_same_run(tmp_path, prototypes):
    import pandas as pd

    models = tiny_ensemble(tmp_path / "models", EnsembleConfig(["head"], "mixture", 0.1, 0.1, 1.0))
    rows = [("nacl", "mp20", 5.0, "NaCl"), ("cu", "wbm", 0.0, "Cu"), ("zno", "wbm", 3.4, "ZnO")]
    pd.DataFrame([{"id": i, "source": source, "band_gap": gap, "split": "test", "cif": prototypes[name].to(fmt="cif")}
                  for i, source, gap, name in rows]).to_parquet(tmp_path / "dataset.parquet")
    summary = report.main(["--dataset", str(tmp_path / "dataset.parquet"), "--models", str(models),
                           "--before", str(models)])
    assert set(summary["metrics"]) == {"v1", "shipped", "before"}
    same = [json.dumps(summary["metrics"][name], sort_keys=True) for name in ("before", "shipped")]
    assert same[0] == same[1]  # the same folder reads the same (compared as text: NaN != NaN)
    assert summary["ensembles"]["before"]["models"] == str(models)


def test_chgnet_feature_cache_computes_each_row_once(tmp_path, monkeypatch):
    import pandas as pd

    from crystallm_core.chem.judges.surrogates import chgnet_cache

    table = pd.DataFrame({"id": ["nacl", "junk"], "cif": [rocksalt_nacl().to(fmt="cif"), "not a CIF"]})
    first, atoms = chgnet_cache.cached_chgnet_features(table, tmp_path / "cache.npz", verbose=False)
    assert first.shape == (2, len(chgnet_feature_names()))
    assert np.isfinite(first[0]).all() and np.isnan(first[1]).all()  # a failed row is NaN, not an error
    assert atoms[0].shape == (len(rocksalt_nacl()), ATOM_FEATURE_DIM) and atoms[1].shape == (0, ATOM_FEATURE_DIM)

    def never(cifs, batch_size=32):
        raise AssertionError("cached rows must not be recomputed")

    monkeypatch.setattr(chgnet_cache, "features_of_cifs", never)
    again, again_atoms = chgnet_cache.cached_chgnet_features(table.iloc[::-1].reset_index(drop=True),
                                                             tmp_path / "cache.npz")
    assert np.array_equal(again[1], first[0]) and np.isnan(again[0]).all()
    assert np.array_equal(again_atoms[1], atoms[0]) and len(again_atoms[0]) == 0


def random_atoms(rng: np.random.Generator, n: int, width: int = 3) -> list[np.ndarray]:
    """1-4 atoms per structure, `width` features each."""
    return [rng.normal(size=(int(rng.integers(1, 5)), width)) for _ in range(n)]


def test_train_head_fits_each_model_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 6))
    atoms = random_atoms(rng, 200)
    band_gap = np.where(features[:, 0] > 0, 0.0, 1.0 + features[:, 1] ** 2)  # metal iff feature 0 > 0
    features[::7, 2] = np.nan  # a missing input (no formation energy) is read as the training mean
    split = np.where(np.arange(200) < 160, "train", "val")
    head = train_head(features, atoms, band_gap, split, HeadConfig(6, 3, hidden=16, n_models=2), epochs=80,
                      batch_size=32)
    p_metal, gap = head.predict(features[160:], atoms[160:])
    assert p_metal.shape == gap.shape == (40, 2) and np.isfinite(p_metal).all() and (gap >= 0).all()
    assert np.mean((p_metal.mean(axis=1) >= 0.5) == (band_gap[160:] == 0)) >= 0.75  # learned the classes (chance: 0.5)
    save_head(head, tmp_path)
    again = load_head(tmp_path).predict(features[160:], atoms[160:])
    assert np.allclose(again[0], p_metal) and np.allclose(again[1], gap)
    alone = head.predict(features[160:161], atoms[160:161])  # a structure reads the same alone as in a batch
    assert np.allclose(alone[0], p_metal[:1], atol=1e-6) and np.allclose(alone[1], gap[:1], atol=1e-5)
    with pytest.raises(ValueError, match="atom features of every structure"):
        head.predict(features[160:162], atoms[160:161])


def test_train_head_fine_tunes_a_copy_of_a_head():
    rng = np.random.default_rng(1)
    features, atoms = rng.normal(size=(120, 6)), random_atoms(rng, 120)
    band_gap = np.where(features[:, 0] > 0, 0.0, 2.0)
    split = np.where(np.arange(120) < 100, "train", "val")
    config = HeadConfig(6, 3, hidden=16, n_models=2)
    start = train_head(features, atoms, band_gap, split, config, epochs=2, batch_size=32)
    before = [v.clone() for v in start.state_dict().values()]
    tuned = train_head(features * 3, atoms, band_gap, split, config, epochs=2, batch_size=32, start=start, lr=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before, start.state_dict().values()))  # the start is left as it was
    assert torch.equal(tuned.mean, start.mean) and torch.equal(tuned.atom_scale, start.atom_scale)  # its standardisation
    assert not torch.equal(tuned.models[0].layers[0].weight, start.models[0].layers[0].weight)  # and trained it


def test_attention_pooling_finds_the_one_atom_that_decides():
    """Metal iff one of the structure's atoms (any position, any count) has feature 0 > 1: no crystal
    feature says so, and the atoms' mean hides it in larger cells."""
    rng = np.random.default_rng(4)
    n = 600
    atoms = random_atoms(rng, n)
    band_gap = np.array([0.0 if (a[:, 0] > 1.0).any() else 2.0 for a in atoms])
    features = rng.normal(size=(n, 2))  # noise
    split = np.where(np.arange(n) < 500, "train", "val")
    head = train_head(features, atoms, band_gap, split, HeadConfig(2, 3, hidden=16, n_models=1), epochs=40,
                      batch_size=50)
    p_metal, _ = head.predict(features[500:], atoms[500:])
    assert np.mean((p_metal[:, 0] >= 0.5) == (band_gap[500:] == 0)) >= 0.9


def test_train_head_row_weights_and_selection_rows():
    """A zero weight removes a row from the loss; the epoch is chosen on the selected val rows only."""
    rng = np.random.default_rng(2)
    features = rng.normal(size=(120, 4))
    atoms = random_atoms(rng, 120)
    band_gap = np.where(features[:, 0] > 0, 0.0, 2.0)
    split = np.where(np.arange(120) < 100, "train", "val")
    poisoned = band_gap.copy()
    poisoned[:50] = 9.0  # nonsense labels on half the train rows …
    weight = np.where(np.arange(120) < 50, 0.0, 1.0)  # … that weigh nothing
    select = np.arange(120) >= 110  # half of val chooses the epochs
    config = HeadConfig(4, 3, hidden=16, n_models=1)
    weighted = train_head(features, atoms, poisoned, split, config, epochs=20, batch_size=25, weight=weight,
                          select=select)
    clean = train_head(features[50:], atoms[50:], band_gap[50:], split[50:], config, epochs=20, batch_size=25,
                       select=select[50:])
    _, gap_weighted = weighted.predict(features[100:], atoms[100:])
    _, gap_clean = clean.predict(features[100:], atoms[100:])
    assert np.abs(gap_weighted[band_gap[100:] > 0] - 2.0).mean() < 1.5  # not pulled towards 9 eV
    assert gap_weighted.shape == gap_clean.shape


def test_calibrate_fits_the_spread_on_rows_read_as_non_metals():
    rng = np.random.default_rng(1)
    n = 4000
    metal = rng.uniform(size=n) < 0.6
    true = np.where(metal, 0.0, rng.uniform(0.5, 5.0, n))
    noise = 0.4 * rng.normal(size=n)  # the regressor's error on non-metals
    p_metal = np.where(metal, 0.95, 0.05)[:, None]
    gap = np.clip(np.where(metal, 1.0, true + noise), 0, None)[:, None]
    config, log = calibrate(EnsembleConfig(["head"]), p_metal, gap, np.zeros((n, 1)), true)
    assert config.spread == "mixture" and config.members == ["head"]
    assert log["coverage_1_read_nonmetal"] == pytest.approx(0.68, abs=0.01)
    assert log["coverage_1"] > 0.68  # metals read as 0 eV are exactly right: they lift coverage over all rows


def test_calibrate_fits_the_scale_on_the_rows_asked_for():
    """Half the rows (the "hypothetical" ones) have twice the error: a scale fitted on them covers
    68 % of them, more of the easy rows, and is larger than one fitted on all rows."""
    rng = np.random.default_rng(2)
    n = 4000
    hard = np.arange(n) < n // 2
    true = rng.uniform(0.5, 5.0, n)
    gap = (true + np.where(hard, 0.8, 0.4) * rng.normal(size=n)).clip(0.01)[:, None]
    args = (EnsembleConfig(["head"]), np.full((n, 1), 0.05), gap, np.zeros((n, 1)), true)
    on_hard, _ = calibrate(*args, scale_rows=hard)
    on_all, _ = calibrate(*args)
    mean, spread, _, _ = combine(args[1], args[2], on_hard, args[3])
    assert coverage(mean[hard] - true[hard], spread[hard]) == pytest.approx(0.68, abs=0.01)
    assert coverage(mean[~hard] - true[~hard], spread[~hard]) > 0.8
    assert on_hard.scale * on_hard.sigma_floor != pytest.approx(on_all.scale * on_all.sigma_floor)


def test_mixture_spread_and_calibration():
    # a confident metal read as 0 eV, a confident non-metal, and a split vote
    spread = mixture_spread([0.99, 0.01, 0.5], [2.0, 3.0, 2.0], [0.0, 3.0, 0.0], [0.3, 0.3, 0.3])
    assert spread[0] == pytest.approx(np.sqrt(0.01 * (4 + 0.09)))
    assert spread[1] == pytest.approx(np.sqrt(0.99 * 0.09 + 0.01 * 9), rel=1e-6)
    assert spread[2] > spread[0]
    rng = np.random.default_rng(0)
    spread = rng.uniform(0.1, 1.0, 20000)
    error = rng.normal(size=20000) * spread * 2.5  # spreads 2.5 times too small
    k = fit_scale(error, spread)
    assert k == pytest.approx(2.5, rel=0.03) and coverage(error, spread, k) == pytest.approx(0.68, abs=0.005)
    assert coverage(error, spread, 2 * k) == pytest.approx(0.954, abs=0.01)
    curve = reliability_curve(error, k * spread)
    assert np.allclose(curve["observed"], curve["nominal"], atol=0.02)


def test_member_weights_blend_the_metal_vote_and_the_gap_apart(tmp_path):
    p_metal = np.array([[0.6, 0.0, 0.2], [0.1, 0.1, 0.1]])  # the head alone would read row 0 as a metal
    gap = np.array([[3.0, 5.0, 7.0], [2.0, 1.0, 0.0]])
    gap_var = np.array([[0.04, 0.0, 0.0], [0.01, 0.0, 0.0]])
    equal = EnsembleConfig(["head", "gnn", "gbm"], "mixture", 0.0, 0.2, 1.0)
    weighted = EnsembleConfig(["head", "gnn", "gbm"], "mixture", 0.0, 0.2, 1.0, [0.8, 0.1, 0.1], [1.0, 0.0, 0.0])
    mean, spread, p, _ = combine(p_metal, gap, weighted, gap_var)
    assert p == pytest.approx([0.8 * 0.6 + 0.1 * 0.2, 0.1])
    assert mean == pytest.approx(gated_gap(p, gap[:, 0]))  # the gap is the head's alone
    head_only = EnsembleConfig(["head"], "mixture", 0.0, 0.2, 1.0)
    assert spread == pytest.approx(combine(p[:, None], gap[:, :1], head_only, gap_var[:, :1])[1])  # no between-member term
    mean_equal, spread_equal, p_equal, _ = combine(p_metal, gap, equal, gap_var)
    assert p_equal == pytest.approx(p_metal.mean(1)) and mean_equal == pytest.approx(gated_gap(p_metal.mean(1), gap.mean(1)))
    sigma = np.sqrt(gap.var(1) + gap_var.mean(1) + 0.2**2)  # equal shares: the spread model as before
    assert spread_equal == pytest.approx(mixture_spread(p_equal, gap.mean(1), mean_equal, sigma))
    weighted.save(tmp_path)
    assert EnsembleConfig.load(tmp_path) == weighted
    with pytest.raises(ValueError, match="do not fit the members"):
        combine(p_metal, gap, EnsembleConfig(["head", "gnn", "gbm"], metal_weights=[1.0, 0.0]))


def test_the_gate_reads_unrelaxed_rows_with_their_own_weights(tmp_path):
    from crystallm_core.chem.judges.chgnet_features import ChgnetFeatures

    p_metal = np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])
    gap = np.array([[1.0, 3.0, 5.0]] * 3)
    gated_config = EnsembleConfig(["head", "gnn", "gbm"], "mixture", 0.0, 0.2, 1.0, [0.8, 0.1, 0.1], [1.0, 0.0, 0.0],
                                  unrelaxed_force_rms=0.7, unrelaxed_stress_max=5.0,
                                  unrelaxed_metal_weights=[0.5, 0.25, 0.25], unrelaxed_gap_weights=[0.5, 0.25, 0.25])
    blank = (np.empty(0), np.empty((0, 0)))
    features = [ChgnetFeatures(*blank, 0.1, 1.0), ChgnetFeatures(*blank, 2.0, 1.0), ChgnetFeatures(*blank)]
    unrelaxed = gated_config.unrelaxed(features)
    assert unrelaxed.tolist() == [False, True, False]  # forces unknown (NaN): never read as unrelaxed
    mean, _, _, _ = combine(p_metal, gap, gated_config, None, unrelaxed)
    expected = gated_gap(np.full(3, 0.1), np.array([1.0, 0.5 * 1.0 + 0.25 * 3.0 + 0.25 * 5.0, 1.0]))
    assert mean == pytest.approx(expected)
    no_verdicts = combine(p_metal, gap, gated_config)[0]  # as before the gate
    assert no_verdicts == pytest.approx(gated_gap(np.full(3, 0.1), np.ones(3)))
    gated_config.save(tmp_path)
    assert EnsembleConfig.load(tmp_path) == gated_config
    assert not EnsembleConfig().unrelaxed(features).any()  # no gate configured


def test_the_reading_form_applies_to_the_blend_not_to_each_members_own_reading(tmp_path):
    p_metal = np.array([[0.6, 0.6], [0.95, 0.95], [0.2, 0.2]])
    gap = np.array([[2.0, 4.0], [3.0, 3.0], [1.0, 1.0]])
    config = EnsembleConfig(["head", "gbm"], "mixture", 0.0, 0.2, 1.0, metal_threshold=0.9, gap_exponent=1.0)
    mean, spread, p, members = combine(p_metal, gap, config)
    assert mean == pytest.approx([0.4 * 3.0, 0.0, 0.8 * 1.0])  # P 0.6 is no longer a metal call
    assert members == pytest.approx(gated_gap(p_metal, gap))  # as the older ensemble reads them
    assert mean == pytest.approx(gated_gap(p, gap.mean(1), 0.9, 1.0)) and (spread > 0).all()
    assert combine(p_metal, gap, EnsembleConfig(["head", "gbm"], "mixture", 0.0, 0.2, 1.0))[0][0] == 0.0  # v4.2 form
    config.save(tmp_path)
    assert EnsembleConfig.load(tmp_path) == config


def test_the_shipped_reading_form_is_the_chosen_one():
    shipped = EnsembleConfig.load(SURROGATE_DIR)
    choice = json.loads((SURROGATE_DIR / "gap_gate_choice.json").read_text())["gate"]
    assert {k: getattr(shipped, k) for k in choice} == choice


def test_the_chgnet_cache_keeps_the_equilibrium_readings(tmp_path):
    import pandas as pd

    from crystallm_core.chem.judges.surrogates import chgnet_cache

    squeezed = rocksalt_nacl()
    squeezed.scale_lattice(squeezed.volume * 0.8)
    table = pd.DataFrame({"id": ["squeezed"], "cif": [squeezed.to(fmt="cif")]})
    [first] = chgnet_cache.cached_features(table, tmp_path / "cache.npz", verbose=False)
    [again] = chgnet_cache.read_cache(tmp_path / "cache.npz").values()
    assert first.stress_max > 5.0 and again.stress_max == pytest.approx(first.stress_max)
    assert again.force_rms == pytest.approx(first.force_rms)


def test_missing_model_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="gnn_config.json"):
        BandGapSurrogate.load(tmp_path)


SHIPPED = (SURROGATE_DIR / "ensemble_config.json").is_file()


@pytest.mark.skipif(not SHIPPED, reason="shipped surrogate weights not present in crystallm_core/assets/surrogates")
def test_shipped_surrogates_know_salt_from_copper():
    surrogate = BandGapSurrogate.load()
    assert "head" in surrogate.config.members and surrogate.config.spread == "mixture"
    nacl, cu = surrogate.predict([rocksalt_nacl(), fcc_cu()])
    assert nacl.p_metal < 0.5 and nacl.mean > 2.0 and nacl.head > 2.0 and 0 < nacl.std < 2.0
    assert cu.p_metal > 0.5 and cu.mean == 0.0 and cu.std < 0.5


def test_out_of_fold_readings_read_each_train_row_without_its_formula(monkeypatch):
    """Every train row is read once, by a head trained without any row of its formula; val rows
    (which choose the epochs) and test rows are never read."""
    from crystallm_core.chem.judges.surrogates import train_head as module

    rng = np.random.default_rng(3)
    n = 150
    features = rng.normal(size=(n, 4))
    atoms = random_atoms(rng, n)
    band_gap = np.where(features[:, 0] > 0, 0.0, 2.0)
    split = np.where(np.arange(n) < 100, "train", np.where(np.arange(n) < 130, "val", "test"))
    groups = np.array([f"formula{i // 3}" for i in range(n)])  # three polymorphs per formula
    weight = np.ones(n)
    seen = []
    real_train_head = module.train_head

    def recording_train_head(features, atoms, band_gap, split, config, epochs, **recipe):
        seen.append(split.copy())
        assert recipe["weight"] is weight  # the shipped head's recipe, passed on
        return real_train_head(features, atoms, band_gap, split, config, epochs, batch_size=25, **recipe)

    monkeypatch.setattr(module, "train_head", recording_train_head)
    config = HeadConfig(4, 3, hidden=8, n_models=2)
    p, gap, var = module.out_of_fold_readings(features, atoms, band_gap, split, groups, config, epochs=2, folds=4,
                                              weight=weight)
    train = split == "train"
    assert np.isfinite(p[train]).all() and np.isfinite(gap[train]).all() and (var[train] >= 0).all()
    assert np.isnan(p[~train]).all()
    assert len(seen) == 4
    held_out = np.stack([fold_split == "held_out" for fold_split in seen])
    assert (held_out.sum(axis=0) == train).all()  # each train row held out exactly once, no other row
    for fold in held_out:
        assert not set(groups[fold]) & set(groups[~fold & train])  # no formula on both sides
        assert (seen[0][split == "val"] == "val").all()
    monkeypatch.setattr(module, "train_head", real_train_head)  # worker processes run the real one
    in_parallel = module.out_of_fold_readings(features, atoms, band_gap, split, groups, config, epochs=2, folds=2,
                                              workers=2, weight=weight)
    one_by_one = module.out_of_fold_readings(features, atoms, band_gap, split, groups, config, epochs=2, folds=2,
                                             weight=weight)
    for a, b in zip(in_parallel, one_by_one):
        assert np.allclose(a, b, equal_nan=True, atol=1e-6)  # the same heads, read the same


def test_a_head_trained_on_other_chgnet_features_is_refused_with_its_reason(tmp_path):
    """A v2 head (258 inputs: the penultimate layer only, no atom features) next to this version's
    features: a clear message at load (the scorer shows it as "band-gap surrogate unavailable"), not
    a shape error; so is a head whose weights do not fit its config (a v3 head has no attention pool)."""
    save_head(GapHead(HeadConfig(258, hidden=8, n_models=1)), tmp_path)
    EnsembleConfig(["head"]).save(tmp_path)
    with pytest.raises(ValueError, match="reads 258 features and 0 per atom, this version computes 1026 and 320.*"
                                         "train_head"):
        BandGapSurrogate.load(tmp_path)
    config = json.loads((tmp_path / "head_config.json").read_text())
    (tmp_path / "head_config.json").write_text(json.dumps({**config, "n_atom_inputs": 320}))
    with pytest.raises(ValueError, match="weights do not fit its config.*train_head"):
        BandGapSurrogate.load(tmp_path)


def test_calibration_rows_are_val_wbm_then_wbm_train_read_out_of_fold(tmp_path, monkeypatch):
    """--calibrate-on oof_wbm: the spread is fitted on the WBM val rows and the WBM train rows read
    out of fold (never MP rows, never test), with the shipped head's recipe; other members: val WBM."""
    import argparse

    import pandas as pd

    from crystallm_core.chem.judges.surrogates import train_head as module

    table = pd.DataFrame({"id": [f"r{i}" for i in range(8)],
                          "source": ["wbm", "mp20", "wbm", "mp20", "wbm", "wbm", "mp20", "wbm"],
                          "split": ["val", "val", "val", "train", "train", "test", "train", "train"],
                          "band_gap": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]})
    table.assign(reduced_formula=[f"F{i}" for i in range(8)]).to_parquet(tmp_path / "dataset.parquet")
    args = argparse.Namespace(calibrate_on="oof_wbm", dataset=tmp_path / "dataset.parquet", epochs=1,
                              wbm_weight=2.0, select_on="val", workers=1)
    val_columns = [np.full((3, 1), 0.1), np.array([[10.0], [11.0], [12.0]]), np.zeros((3, 1))]
    seen = {}

    def fake_oof(features, atoms, y, split, groups, config, epochs, workers, **recipe):
        seen["recipe"] = recipe
        return np.full(8, 0.2), np.arange(100.0, 108.0), np.zeros(8)

    def fake_calibrate(config, p_metal, gap, gap_var, y, scale_rows):
        seen.update(gap=gap[:, 0].tolist(), y=y.tolist(), scale_rows=scale_rows)
        return config, {}

    monkeypatch.setattr(module, "out_of_fold_readings", fake_oof)
    monkeypatch.setattr(module, "calibrate", fake_calibrate)
    _, log = module.calibrate_on_rows(args, ["head"], val_columns, table, np.zeros((8, 2)), [], HeadConfig(2))
    assert seen["gap"] == [10.0, 12.0, 104.0, 107.0] and seen["y"] == [0.0, 2.0, 4.0, 7.0]
    assert seen["scale_rows"].all() and log["rows"] == "oof_wbm" and log["n"] == 4
    wbm, mp = log["out_of_fold_train"]["wbm"], log["out_of_fold_train"]["mp"]  # train rows only, apart
    assert (wbm["n"], mp["n"]) == (2, 2) and wbm["mae"] == pytest.approx(np.mean([0.8**0.5 * 104 - 4, 0.8**0.5 * 107 - 7]))
    assert seen["recipe"]["weight"].tolist() == [2.0, 1.0, 2.0, 1.0, 2.0, 2.0, 1.0, 2.0]

    _, log = module.calibrate_on_rows(args, ["head", "gnn"], val_columns, table, np.zeros((8, 2)), [],
                                     HeadConfig(2))
    assert log["rows"] == "val_wbm" and seen["gap"] == [10.0, 11.0, 12.0]
    assert seen["scale_rows"].tolist() == [True, False, True]
