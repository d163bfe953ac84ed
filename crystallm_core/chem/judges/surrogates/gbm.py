"""LightGBM reading: a metal / non-metal classifier and a gap regressor trained on non-metals.

Both boosters are stored in LightGBM's own text format (no pickle), next to the GNN files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np

CLASSIFIER_FILE = "gbm_classifier.txt"
REGRESSOR_FILE = "gbm_regressor.txt"


@dataclass
class GBMModel:
    classifier: lgb.Booster  # P(metal)
    regressor: lgb.Booster  # band gap (eV) assuming a non-metal

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P(metal), gap if non-metal) for a (n, n_features) matrix."""
        features = np.atleast_2d(features)
        p_metal = self.classifier.predict(features)
        gap = np.clip(self.regressor.predict(features), 0.0, None)
        return p_metal, gap

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.classifier.save_model(out_dir / CLASSIFIER_FILE)
        self.regressor.save_model(out_dir / REGRESSOR_FILE)

    @classmethod
    def load(cls, model_dir: Path, expected_features: list[str]) -> GBMModel:
        """Load both boosters; ValueError if they were trained on a different feature set."""
        model = cls(lgb.Booster(model_file=str(Path(model_dir) / CLASSIFIER_FILE)),
                    lgb.Booster(model_file=str(Path(model_dir) / REGRESSOR_FILE)))
        for booster in (model.classifier, model.regressor):
            if booster.feature_name() != expected_features:
                raise ValueError(f"{model_dir}: LightGBM model was trained on other features; retrain it "
                                 "(python -m crystallm_core.chem.judges.surrogates.train_gbm)")
        return model
