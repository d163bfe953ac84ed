"""The CHGNet gap head: a small deep ensemble of MLPs on CHGNet's pretrained crystal features.

CHGNet (trained on 1.5 M MPtrj structures) is run anyway for the stability estimate; its crystal
representation (`chgnet_features.crystal_features`) is a strong input for a band gap. Each MLP has a
metal logit and the gap a non-metal would have, as the other readings; the models differ only
in their seed, and their disagreement is part of the ensemble's spread. Plain torch, no pymatgen.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_WEIGHTS_FILE = "head.safetensors"
HEAD_CONFIG_FILE = "head_config.json"


@dataclass
class HeadConfig:
    n_inputs: int
    descriptors: bool = False  # inputs: CHGNet's crystal features, and then the descriptors of features.py
    hidden: int = 256
    n_models: int = 5
    dropout: float = 0.1


class MLP(nn.Module):
    def __init__(self, config: HeadConfig):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(config.n_inputs, config.hidden), nn.SiLU(), nn.Dropout(config.dropout),
                                    nn.Linear(config.hidden, config.hidden // 2), nn.SiLU(),
                                    nn.Linear(config.hidden // 2, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(metal logit, gap if non-metal in eV) for standardised inputs."""
        out = self.layers(x)
        return out[:, 0], nn.functional.softplus(out[:, 1])


class GapHead(nn.Module):
    """`n_models` MLPs over the same standardised features (mean / scale stored with the weights)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.models = nn.ModuleList(MLP(config) for _ in range(config.n_models))
        self.register_buffer("mean", torch.zeros(config.n_inputs))
        self.register_buffer("scale", torch.ones(config.n_inputs))

    def standardise(self, features: np.ndarray) -> torch.Tensor:
        """Z-scores; a missing value (NaN, e.g. no formation energy) becomes the training mean."""
        x = (torch.tensor(np.asarray(features, dtype=np.float32)) - self.mean) / self.scale
        return torch.nan_to_num(x, nan=0.0)

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P(metal), gap if non-metal), each (n, n_models) float64, for a (n, n_inputs) matrix."""
        self.eval()
        x = self.standardise(np.atleast_2d(features))
        outputs = [model(x) for model in self.models]
        p_metal = torch.stack([torch.sigmoid(logit) for logit, _ in outputs], 1)
        gap = torch.stack([g for _, g in outputs], 1)
        return p_metal.double().numpy(), gap.double().numpy()


def save_head(head: GapHead, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, out_dir / HEAD_WEIGHTS_FILE)
    (out_dir / HEAD_CONFIG_FILE).write_text(json.dumps(asdict(head.config), indent=1) + "\n")


def load_head(model_dir: Path) -> GapHead:
    """Load a head written by `save_head` (CPU, eval mode)."""
    head = GapHead(HeadConfig(**json.loads((Path(model_dir) / HEAD_CONFIG_FILE).read_text())))
    head.load_state_dict(load_file(Path(model_dir) / HEAD_WEIGHTS_FILE))
    return head.eval()
