"""LightGBM readings: a metal / non-metal classifier and a gap regressor trained on non-metals.

Two readings use it: "gbm" on the descriptors of `features.py` and "head" on CHGNet's crystal
features next to those descriptors. Boosters are stored in LightGBM's own text format (no
pickle) as `{prefix}_classifier.txt` and `{prefix}_regressor.txt`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np


def model_files(prefix: str) -> tuple[str, str]:
    """(classifier, regressor) file names of the reading called `prefix`."""
    return f"{prefix}_classifier.txt", f"{prefix}_regressor.txt"


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

    def save(self, out_dir: Path, prefix: str = "gbm") -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        classifier, regressor = model_files(prefix)
        self.classifier.save_model(out_dir / classifier)
        self.regressor.save_model(out_dir / regressor)

    @classmethod
    def load(cls, model_dir: Path, expected_features: list[str], prefix: str = "gbm") -> GBMModel:
        """Load both boosters; ValueError if they were trained on a different feature set."""
        classifier, regressor = model_files(prefix)
        model = cls(lgb.Booster(model_file=str(Path(model_dir) / classifier)),
                    lgb.Booster(model_file=str(Path(model_dir) / regressor)))
        for booster in (model.classifier, model.regressor):
            if booster.feature_name() != expected_features:
                raise ValueError(f"{model_dir}: LightGBM model was trained on other features; retrain it "
                                 "(python -m crystallm_core.chem.surrogates.train_gbm or train_head)")
        return model
