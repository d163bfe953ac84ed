"""Two independent band-gap readings (graph network, LightGBM) and their ensemble.

    surrogate = BandGapSurrogate.load()            # shipped weights, offline
    [p] = surrogate.predict([structure])           # p.gnn, p.gbm, p.mean, p.std, p.p_metal

The spread between the readings is the uncertainty shown to users. A structure that cannot be
featurised gets NaNs and a `reason`; it never breaks the batch.

    python -m crystallm_core.chem.surrogates.ensemble   # score the shipped models on the val / test split
        [--predictions test_predictions.csv]       # + per-structure test readings (Model page parity plot)
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Structure

from crystallm_core.chem.surrogates.cgcnn import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CrystalGNN,
    GraphStore,
    load_gnn,
    predict_gap,
)
from crystallm_core.chem.surrogates.features import feature_names, structure_features
from crystallm_core.chem.surrogates.gbm import CLASSIFIER_FILE, REGRESSOR_FILE, GBMModel
from crystallm_core.chem.surrogates.graphs import (
    CrystalGraph,
    GraphConfig,
    pack_graphs,
    structure_to_graph,
)
from crystallm_core.chem.surrogates.scoring import gated_gap, report_splits
from crystallm_core.paths import SURROGATE_DIR, cache_dir

NAN = float("nan")


@dataclass
class GapPrediction:
    gnn: float  # graph-network reading, eV
    gbm: float  # LightGBM reading, eV
    mean: float  # ensemble band gap, eV
    std: float  # half the gap between the readings: disagreement as uncertainty, eV
    p_metal: float  # mean of the two classifiers' P(metal)
    reason: str | None = None  # why the readings are NaN, if they are

    def to_dict(self) -> dict:
        return asdict(self)


def combine(p_metal: np.ndarray, gap: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ensemble of per-model (P(metal), gap if non-metal) columns (n, 2): (band gap, P(metal), readings)."""
    readings = gated_gap(p_metal, gap)
    # Gate once with the averaged probability: averaging two gated readings would turn a
    # split vote (0 eV vs 3 eV) into 1.5 eV, which is wrong for both outcomes.
    mean_p = p_metal.mean(axis=1)
    return gated_gap(mean_p, gap.mean(axis=1)), mean_p, readings


class BandGapSurrogate:
    def __init__(self, gnn: CrystalGNN, gbm: GBMModel):
        self.gnn, self.gbm = gnn, gbm
        self.graph_config = GraphConfig(gnn.config.cutoff, gnn.config.max_neighbors)

    @classmethod
    def load(cls, dir: Path = SURROGATE_DIR) -> BandGapSurrogate:
        """Load both readings from `dir` (FileNotFoundError naming the missing file)."""
        dir = Path(dir)
        for name in (CONFIG_FILE, WEIGHTS_FILE, CLASSIFIER_FILE, REGRESSOR_FILE):
            if not (dir / name).is_file():
                raise FileNotFoundError(f"band-gap surrogate file missing: {dir / name}")
        return cls(load_gnn(dir), GBMModel.load(dir, feature_names()))

    def featurise(self, structure: Structure) -> tuple[CrystalGraph, np.ndarray]:
        """(graph, feature vector) for one structure; ValueError with a readable reason otherwise."""
        if not isinstance(structure, Structure):
            raise ValueError(f"expected a pymatgen Structure, got {type(structure).__name__}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph, features = structure_to_graph(structure, self.graph_config), structure_features(structure)
        if not np.isfinite(features).all() or not np.isfinite(graph.distances).all():
            raise ValueError("non-finite geometry (overlapping atoms or a degenerate lattice?)")
        return graph, features

    def predict(self, structures: list[Structure]) -> list[GapPrediction]:
        """One GapPrediction per structure, in order."""
        graphs, features, reasons = [], [], []
        for structure in structures:
            try:
                graph, vector = self.featurise(structure)
                graphs.append(graph)
                features.append(vector)
                reasons.append(None)
            except Exception as error:  # one bad structure must not spoil the batch
                reasons.append(f"could not featurise: {error}" if str(error) else type(error).__name__)
        if not graphs:
            return [GapPrediction(NAN, NAN, NAN, NAN, NAN, reason) for reason in reasons]
        store = GraphStore(pack_graphs(graphs))
        gnn_p, gnn_gap = predict_gap(self.gnn, store, np.arange(len(graphs)))
        gbm_p, gbm_gap = self.gbm.predict(np.stack(features))
        mean, p_metal, readings = combine(np.stack([gnn_p, gbm_p], 1), np.stack([gnn_gap, gbm_gap], 1))
        ok = iter(range(len(graphs)))
        out = []
        for reason in reasons:
            if reason is not None:
                out.append(GapPrediction(NAN, NAN, NAN, NAN, NAN, reason))
                continue
            i = next(ok)
            out.append(GapPrediction(float(readings[i, 0]), float(readings[i, 1]), float(mean[i]),
                                     float(abs(readings[i, 0] - readings[i, 1]) / 2), float(p_metal[i])))
        return out


def main(argv: list[str] | None = None) -> None:
    import pandas as pd  # evaluation only

    parser = argparse.ArgumentParser(description="Score the band-gap surrogates on the val / test split.")
    parser.add_argument("--dataset", type=Path, default=cache_dir() / "dataset.parquet")
    parser.add_argument("--models", type=Path, default=SURROGATE_DIR)
    parser.add_argument("--out", type=Path, default=None, help="write the metrics JSON here")
    parser.add_argument("--predictions", type=Path, default=None,
                        help="write the test rows' readings here (CSV: id, source, split, true, pred, std, gnn, gbm, "
                             "p_metal)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.time()
    surrogate = BandGapSurrogate.load(args.models)
    load_seconds = time.time() - start
    table = pd.read_parquet(args.dataset, columns=["id", "source", "band_gap", "split", "cif"])
    table = table[table.band_gap.notna() & table.split.isin(["val", "test"])].reset_index(drop=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structures = [Structure.from_str(cif, fmt="cif") for cif in table.cif]
    start = time.time()
    predictions = [p for first in range(0, len(structures), 64)
                   for p in surrogate.predict(structures[first:first + 64])]
    ms_per_structure = 1000 * (time.time() - start) / len(structures)

    y, split, source = table.band_gap.to_numpy(float), table.split.to_numpy(str), table.source.to_numpy(str)
    ok = np.array([p.reason is None for p in predictions])
    readings = {name: np.array([getattr(p, name) for p in predictions])
                for name in ("gnn", "gbm", "mean", "std", "p_metal")}
    # A gated reading is exactly 0 iff its classifier said metal, so that is the class it predicted.
    metrics = {name: report_splits(y[ok], pred[ok], (pred[ok] <= 0).astype(float), split[ok], source[ok])
               for name, pred in readings.items() if name in ("gnn", "gbm", "mean")}
    error = np.abs(readings["mean"][ok] - y[ok])
    summary = {"metrics": metrics, "failed": int((~ok).sum()), "load_seconds": round(load_seconds, 2),
               "ms_per_structure": round(ms_per_structure, 2), "torch_threads": torch.get_num_threads(),
               "std_error_spearman": float(pd.Series(readings["std"][ok]).corr(pd.Series(error), method="spearman"))}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    if args.predictions:
        # Rounded to 0.1 meV: far below the error, and keeps the shipped file small.
        rows = pd.DataFrame({"id": table.id, "source": source, "split": split, "true": y, "pred": readings["mean"],
                             **{name: readings[name] for name in ("std", "gnn", "gbm", "p_metal")}})
        rows[ok & (split == "test")].round(4).to_csv(args.predictions, index=False)


if __name__ == "__main__":
    main()
