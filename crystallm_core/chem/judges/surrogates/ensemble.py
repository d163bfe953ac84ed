"""Band-gap readings and their calibrated ensemble.

    surrogate = BandGapSurrogate.load()              # shipped weights, offline
    [p] = surrogate.predict([structure])             # p.mean ± p.std, p.p_metal; p.head, p.gnn, p.gbm
    surrogate.predict(structures, chgnet=features)   # reuse the CHGNet forward of the stability estimate

Three readings can take part, each a metal classifier plus a non-metal gap regressor: "head"
(a deep ensemble of networks on CHGNet's pretrained features, `head.py`), "gnn" (the
crystal graph network) and "gbm" (LightGBM on the descriptors of `features.py`).
`ensemble_config.json` names the members and the calibration of the spread (chosen on the
validation split by `train_head`). A structure that cannot be featurised gets NaNs and a
`reason`; it never breaks the batch.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from pymatgen.core import Structure

from crystallm_core.chem.judges.chgnet_features import (
    ATOM_FEATURE_DIM,
    ChgnetFeatures,
    chgnet_feature_names,
)
from crystallm_core.chem.judges.stability import static_readings
from crystallm_core.chem.judges.surrogates.calibration import mixture_spread
from crystallm_core.chem.judges.surrogates.cgcnn import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CrystalGNN,
    GraphStore,
    load_gnn,
    predict_gap,
)
from crystallm_core.chem.judges.surrogates.features import feature_names, structure_features
from crystallm_core.chem.judges.surrogates.gbm import CLASSIFIER_FILE, REGRESSOR_FILE, GBMModel
from crystallm_core.chem.judges.surrogates.graphs import (
    GraphConfig,
    pack_graphs,
    structure_to_graph,
)
from crystallm_core.chem.judges.surrogates.head import (
    HEAD_CONFIG_FILE,
    HEAD_WEIGHTS_FILE,
    GapHead,
    load_head,
)
from crystallm_core.chem.judges.surrogates.scoring import gated_gap
from crystallm_core.paths import SURROGATE_DIR

NAN = float("nan")
ENSEMBLE_CONFIG_FILE = "ensemble_config.json"


@dataclass
class EnsembleConfig:
    """Which readings are averaged and how their spread becomes the "±" (see calibration.py)."""

    members: list[str] = field(default_factory=lambda: ["gnn", "gbm"])
    spread: str = "disagreement"  # "disagreement": half the gap between two readings (v1); "mixture"
    sigma_relative: float = 0.0  # mixture: the regressor's error, sigma = hypot(readings' std, rel·g, floor)
    sigma_floor: float = 0.0  # eV
    scale: float = 1.0  # k, fitted on val so that ±1 spread covers 68 % of the rows read as non-metals
    # Each member's share of the averaged P(metal) and of the averaged gap (None: equal shares). A blend
    # can lean on the head for the gap of relaxed structures and still let robust members vote.
    metal_weights: list[float] | None = None
    gap_weights: list[float] | None = None
    # A structure CHGNet reads far from equilibrium (force RMS ≥ unrelaxed_force_rms eV/Å, or a stress
    # component ≥ unrelaxed_stress_max GPa: what a generative model writes) is read with the unrelaxed
    # weights instead. The head was trained on relaxed structures; on unrelaxed ones a blend with the
    # graph models ranks like ALIGNN more often (`scripts/choose_gap_gate.py`). None: no such gate.
    unrelaxed_force_rms: float | None = None
    unrelaxed_stress_max: float | None = None
    unrelaxed_metal_weights: list[float] | None = None
    unrelaxed_gap_weights: list[float] | None = None
    # How the blended (P(metal), gap) becomes one reading (scoring.gated_gap): 0 eV at or above the
    # threshold, else the gap times (1 - P) ** exponent. 0.5 / 0.5 is the median-like rule of v1-v4.2;
    # exponent 1 is the mixture's mean, what squared error (R²) rewards.
    metal_threshold: float = 0.5
    gap_exponent: float = 0.5

    def weights(self, kind: str, unrelaxed: bool = False) -> np.ndarray:
        """The members' normalised weights of "metal" or "gap" (for unrelaxed structures, if asked)."""
        given = self.metal_weights if kind == "metal" else self.gap_weights
        if unrelaxed:
            given = self.unrelaxed_metal_weights if kind == "metal" else self.unrelaxed_gap_weights
        w = np.ones(len(self.members)) if given is None else np.asarray(given, dtype=float)
        if len(w) != len(self.members) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"{kind} weights {given} do not fit the members {self.members}")
        return w / w.sum()

    def unrelaxed(self, features: Sequence[ChgnetFeatures | None]) -> np.ndarray:
        """Per structure: whether the gate reads it as unrelaxed (never where the forces are unknown)."""
        if self.unrelaxed_force_rms is None or self.unrelaxed_stress_max is None:
            return np.zeros(len(features), dtype=bool)
        force = np.array([np.nan if f is None else f.force_rms for f in features], dtype=float)
        stress = np.array([np.nan if f is None else f.stress_max for f in features], dtype=float)
        with np.errstate(invalid="ignore"):
            return (force >= self.unrelaxed_force_rms) | (stress >= self.unrelaxed_stress_max)

    def row_weights(self, kind: str, unrelaxed: np.ndarray | None, n: int) -> np.ndarray:
        """(n, members) weights: the relaxed ones, or the unrelaxed ones on the rows the gate marks."""
        relaxed = np.tile(self.weights(kind), (n, 1))
        if unrelaxed is None or not np.any(unrelaxed):
            return relaxed
        return np.where(np.asarray(unrelaxed)[:, None], self.weights(kind, unrelaxed=True), relaxed)

    @classmethod
    def load(cls, directory: Path) -> EnsembleConfig:
        path = Path(directory) / ENSEMBLE_CONFIG_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()

    def save(self, directory: Path) -> None:
        (Path(directory) / ENSEMBLE_CONFIG_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")


V1_CONFIG = EnsembleConfig()  # the ensemble shipped before the CHGNet head (model card: "v1")


@dataclass
class GapPrediction:
    mean: float  # ensemble band gap, eV
    std: float  # calibrated ± (one spread), eV
    p_metal: float  # mean of the members' P(metal)
    head: float = NAN  # each member's own gated reading, eV (NaN when it is not a member)
    gnn: float = NAN
    gbm: float = NAN
    unrelaxed: bool = False  # read with the unrelaxed weights (CHGNet: far from equilibrium)
    reason: str | None = None  # why the readings are NaN, if they are

    def to_dict(self) -> dict:
        return asdict(self)


def member_columns(readings: dict[str, tuple[np.ndarray, ...]], members: list[str]) -> list[np.ndarray]:
    """The members' (P(metal), gap, gap variance) readings side by side: three (n, m) arrays, as
    `combine` takes them."""
    return [np.stack([readings[m][i] for m in members], 1) for i in range(3)]


def combine(p_metal: np.ndarray, gap: np.ndarray, config: EnsembleConfig, gap_var: np.ndarray | None = None,
            unrelaxed: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Members' (P(metal), gap if non-metal) columns (n, m), the variance of each member's own gap
    among its models (n, m; the head's MLPs), and which rows the gate reads as unrelaxed (n,)
    -> (band gap, ±, P(metal), readings (n, m))."""
    readings = gated_gap(p_metal, gap)  # each member's own reading, in the form it was trained and judged with
    # Gate once with the averaged probability: averaging two gated readings would turn a
    # split vote (0 eV vs 3 eV) into 1.5 eV, which is wrong for both outcomes.
    metal_w = config.row_weights("metal", unrelaxed, len(gap))
    gap_w = config.row_weights("gap", unrelaxed, len(gap))
    mean_p, mean_gap = (p_metal * metal_w).sum(axis=1), (gap * gap_w).sum(axis=1)
    mean = gated_gap(mean_p, mean_gap, config.metal_threshold, config.gap_exponent)
    if config.spread == "disagreement":
        spread = np.abs(readings[:, 0] - readings[:, -1]) / 2
    else:
        within = 0.0 if gap_var is None else (gap_var * gap_w).sum(axis=1)
        between = (((gap - mean_gap[:, None]) ** 2) * gap_w).sum(axis=1)
        sigma = np.sqrt(between + within + (config.sigma_relative * mean_gap) ** 2 + config.sigma_floor**2)
        spread = mixture_spread(mean_p, mean_gap, mean, sigma)
    return mean, config.scale * spread, mean_p, readings


class BandGapSurrogate:
    def __init__(self, config: EnsembleConfig, models: dict[str, CrystalGNN | GBMModel | GapHead]):
        missing = set(config.members) - set(models)
        if missing or not config.members:
            raise ValueError(f"ensemble members without a model: {sorted(missing) or 'none listed'}")
        self.config, self.models = config, models
        gnn = models.get("gnn")
        self.graph_config = GraphConfig(gnn.config.cutoff, gnn.config.max_neighbors) if gnn else None
        head = models.get("head")
        self.needs_descriptors = "gbm" in models or (head is not None and head.config.descriptors)
        if head is not None:
            expected = len(chgnet_feature_names()) + (len(feature_names()) if head.config.descriptors else 0)
            if (head.config.n_inputs, head.config.n_atom_inputs) != (expected, ATOM_FEATURE_DIM):
                raise ValueError(f"the band-gap head reads {head.config.n_inputs} features and "
                                 f"{head.config.n_atom_inputs} per atom, this version computes {expected} and "
                                 f"{ATOM_FEATURE_DIM}: it was trained on other CHGNet features (retrain it with train_head)")

    @classmethod
    def load(cls, dir: Path = SURROGATE_DIR, config: EnsembleConfig | None = None) -> BandGapSurrogate:
        """The members named in ensemble_config.json (or `config`) from `dir`; FileNotFoundError names a
        missing file."""
        dir = Path(dir)
        config = config or EnsembleConfig.load(dir)
        files = {"gnn": (CONFIG_FILE, WEIGHTS_FILE), "gbm": (CLASSIFIER_FILE, REGRESSOR_FILE),
                 "head": (HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE)}
        for name in (f for member in config.members for f in files[member]):
            if not (dir / name).is_file():
                raise FileNotFoundError(f"band-gap surrogate file missing: {dir / name}")
        loaders = {"gnn": lambda: load_gnn(dir), "gbm": lambda: GBMModel.load(dir, feature_names()),
                   "head": lambda: load_head(dir)}
        return cls(config, {member: loaders[member]() for member in config.members})

    def featurise(self, structure: Structure) -> tuple[object, np.ndarray | None]:
        """(graph, descriptors), each None when no member needs it; ValueError with a readable reason."""
        if not isinstance(structure, Structure):
            raise ValueError(f"expected a pymatgen Structure, got {type(structure).__name__}")
        if not structure.is_ordered:
            raise ValueError("disordered structure (partial occupancies) is not supported")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            features = structure_features(structure) if self.needs_descriptors else None
            graph = structure_to_graph(structure, self.graph_config) if self.graph_config else None
        if (features is not None and not np.isfinite(features).all()) or (
                graph is not None and not np.isfinite(graph.distances).all()):
            raise ValueError("non-finite geometry (overlapping atoms or a degenerate lattice?)")
        return graph, features

    def readings(self, structures: Sequence[Structure], chgnet: Sequence[ChgnetFeatures | None] | None = None,
                 ) -> tuple[list[str | None], dict[str, tuple[np.ndarray, ...]]]:
        """Per-structure failure reasons, and each member's (P(metal), gap, variance of the gap among its
        models) over the structures without one.

        `chgnet` holds each structure's `ChgnetFeatures` where already computed; the rest are computed
        here (one CHGNet forward each), and filled in when `chgnet` is a list."""
        if chgnet is None:
            chgnet = [None] * len(structures)
        elif not isinstance(chgnet, list):
            chgnet = list(chgnet)
        graphs, descriptors, reasons = [], [], []
        for structure in structures:
            try:
                graph, vector = self.featurise(structure)
                graphs.append(graph)
                descriptors.append(vector)
                reasons.append(None)
            except Exception as error:  # one bad structure must not spoil the batch
                reasons.append(f"could not featurise: {error}" if str(error) else type(error).__name__)
        ok = [i for i, reason in enumerate(reasons) if reason is None]
        if "head" in self.models:
            todo = [i for i in ok if chgnet[i] is None]
            for i, reading in zip(todo, static_readings([structures[i] for i in todo]) if todo else []):
                if isinstance(reading, str):
                    reasons[i] = reading
                else:
                    chgnet[i] = reading.features
        keep = [k for k, i in enumerate(ok) if reasons[i] is None]
        if not keep:
            return reasons, {}
        out = {}
        descriptors = np.stack([descriptors[k] for k in keep]) if self.needs_descriptors else None
        for member, model in self.models.items():
            if member == "gnn":
                store = GraphStore(pack_graphs([graphs[k] for k in keep]))
                out[member] = (*predict_gap(model, store, np.arange(len(keep))), np.zeros(len(keep)))
            elif member == "gbm":
                out[member] = (*model.predict(descriptors), np.zeros(len(keep)))
            else:
                inputs = np.stack([chgnet[ok[k]].crystal for k in keep])
                p, gap = model.predict(np.hstack([inputs, descriptors]) if model.config.descriptors else inputs,
                                       [chgnet[ok[k]].atoms for k in keep])
                out[member] = (p.mean(axis=1), gap.mean(axis=1), gap.var(axis=1))
        return reasons, out

    def predict(self, structures: Sequence[Structure], chgnet: Sequence[ChgnetFeatures | None] | None = None,
                ) -> list[GapPrediction]:
        """One GapPrediction per structure, in order (see `readings` for `chgnet`)."""
        chgnet = [None] * len(structures) if chgnet is None else list(chgnet)
        reasons, readings = self.readings(structures, chgnet)  # fills in the CHGNet features it computes
        if not readings:
            return [GapPrediction(NAN, NAN, NAN, reason=reason) for reason in reasons]
        members = self.config.members
        p_metal_in, gap_in, gap_var = member_columns(readings, members)
        unrelaxed = self.config.unrelaxed([chgnet[i] for i, reason in enumerate(reasons) if reason is None])
        mean, spread, p_metal, gated = combine(p_metal_in, gap_in, self.config, gap_var, unrelaxed)
        ok = iter(range(len(mean)))
        out = []
        for reason in reasons:
            if reason is not None:
                out.append(GapPrediction(NAN, NAN, NAN, reason=reason))
                continue
            i = next(ok)
            own = {member: float(gated[i, j]) for j, member in enumerate(members)}
            out.append(GapPrediction(float(mean[i]), float(spread[i]), float(p_metal[i]), **own,
                                     unrelaxed=bool(unrelaxed[i])))
        return out
