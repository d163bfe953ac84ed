"""The CHGNet gap head: a small deep ensemble of networks on CHGNet's pretrained features.

CHGNet (trained on 1.5 M MPtrj structures) is run anyway for the stability estimate. Each network
reads two things from that pass (`chgnet_features.ChgnetFeatures`): the crystal vector (mean /
max / std of every layer's atom features) and the atom features themselves, which it pools with
a learned attention (`AtomAttentionPool`): a gap is often set by a few atoms (the anion, a
transition metal), and a fixed mean or max cannot choose them. Each network has a metal logit and
the gap a non-metal would have, as the other readings; the networks differ only in their seed,
and their disagreement is part of the ensemble's spread. Plain torch, no pymatgen.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_WEIGHTS_FILE = "head.safetensors"
HEAD_CONFIG_FILE = "head_config.json"


@dataclass
class HeadConfig:
    n_inputs: int  # crystal vector (and descriptors)
    n_atom_inputs: int = 0  # features of one atom (0: a head from before atom pooling, refused on load)
    descriptors: bool = False  # inputs: CHGNet's crystal features, and then the descriptors of features.py
    hidden: int = 256
    n_models: int = 5
    dropout: float = 0.1
    atom_hidden: int = 128
    pool_heads: int = 4
    pool_dim: int = 32


class AtomTable:
    """Atom features of many structures in one (n_atoms, n) tensor, so a batch is one gather."""

    def __init__(self, atoms: Sequence[np.ndarray], n_atom_inputs: int):
        self.sizes = np.array([len(a) for a in atoms], dtype=np.int64)
        self.starts = np.cumsum(self.sizes) - self.sizes
        blocks = [np.asarray(a, dtype=np.float32).reshape(-1, n_atom_inputs) for a in atoms]
        self.values = torch.from_numpy(np.concatenate(blocks) if blocks else np.zeros((0, n_atom_inputs), np.float32))

    def rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(atom features of these structures, the batch position of each atom's structure)."""
        sizes = self.sizes[rows]
        first_in_batch = np.repeat(np.cumsum(sizes) - sizes, sizes)
        index = np.arange(sizes.sum()) - first_in_batch + np.repeat(self.starts[rows], sizes)
        return self.values[torch.from_numpy(index)], torch.from_numpy(np.repeat(np.arange(len(rows)), sizes))


class AtomAttentionPool(nn.Module):
    """`heads` softmax-weighted sums over each structure's atoms, every head with its own scores."""

    def __init__(self, n_in: int, hidden: int, heads: int, dim: int):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.embed = nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU())
        self.score = nn.Linear(hidden, heads)
        self.value = nn.Linear(hidden, heads * dim)

    def forward(self, atoms: torch.Tensor, owner: torch.Tensor, n_structures: int) -> torch.Tensor:
        h = self.embed(atoms)
        score = self.score(h)
        by_owner = owner[:, None].expand_as(score)
        top = torch.zeros(n_structures, self.heads).scatter_reduce(0, by_owner, score, "amax", include_self=False)
        weight = torch.exp(score - top[owner])  # a softmax within each structure, stable
        weight = weight / torch.zeros(n_structures, self.heads).index_add(0, owner, weight)[owner]
        values = weight[..., None] * self.value(h).view(len(h), self.heads, self.dim)
        return torch.zeros(n_structures, self.heads, self.dim).index_add(0, owner, values).flatten(1)


class MLP(nn.Module):
    def __init__(self, config: HeadConfig):
        super().__init__()
        self.pool = AtomAttentionPool(config.n_atom_inputs, config.atom_hidden, config.pool_heads, config.pool_dim)
        self.layers = nn.Sequential(nn.Linear(config.n_inputs + config.pool_heads * config.pool_dim, config.hidden),
                                    nn.SiLU(), nn.Dropout(config.dropout),
                                    nn.Linear(config.hidden, config.hidden // 2), nn.SiLU(),
                                    nn.Linear(config.hidden // 2, 2))

    def forward(self, x: torch.Tensor, atoms: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(metal logit, gap if non-metal in eV) for standardised inputs; owner: each atom's row of x."""
        out = self.layers(torch.cat([x, self.pool(atoms, owner, len(x))], 1))
        return out[:, 0], nn.functional.softplus(out[:, 1])


class GapHead(nn.Module):
    """`n_models` networks over the same standardised features (mean / scale stored with the weights)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.models = nn.ModuleList(MLP(config) for _ in range(config.n_models))
        self.register_buffer("mean", torch.zeros(config.n_inputs))
        self.register_buffer("scale", torch.ones(config.n_inputs))
        self.register_buffer("atom_mean", torch.zeros(config.n_atom_inputs))
        self.register_buffer("atom_scale", torch.ones(config.n_atom_inputs))

    def fit_standardisation(self, features: np.ndarray, atoms: torch.Tensor) -> None:
        """Mean and scale of these (training) rows and of their (n_atoms, n_atom_inputs) atom features;
        NaN entries of `features` are skipped."""
        self.mean.copy_(torch.as_tensor(np.nanmean(features, axis=0), dtype=torch.float32))
        self.scale.copy_(torch.as_tensor(np.nanstd(features, axis=0) + 1e-6, dtype=torch.float32))
        self.atom_mean.copy_(atoms.mean(0))
        self.atom_scale.copy_(atoms.std(0) + 1e-3)

    def standardise(self, features: np.ndarray) -> torch.Tensor:
        """Z-scores; a missing value (NaN, e.g. no formation energy) becomes the training mean."""
        x = (torch.tensor(np.asarray(features, dtype=np.float32)) - self.mean) / self.scale
        return torch.nan_to_num(x, nan=0.0)

    def atom_table(self, atoms: Sequence[np.ndarray] | AtomTable) -> AtomTable:
        """The structures' atom features, standardised (an AtomTable given is standardised in place)."""
        table = atoms if isinstance(atoms, AtomTable) else AtomTable(atoms, self.config.n_atom_inputs)
        table.values = (table.values - self.atom_mean) / self.atom_scale
        return table

    @torch.no_grad()
    def predict(self, features: np.ndarray, atoms: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(P(metal), gap if non-metal), each (n, n_models) float64, for a (n, n_inputs) matrix and
        each structure's (n_sites, n_atom_inputs) atom features."""
        features = np.atleast_2d(features)
        if len(atoms) != len(features) or any(len(a) == 0 for a in atoms):
            raise ValueError("the head needs the atom features of every structure it reads")
        self.eval()
        x = self.standardise(features)
        batch_atoms, owner = self.atom_table(atoms).rows(np.arange(len(features)))
        outputs = [model(x, batch_atoms, owner) for model in self.models]
        p_metal = torch.stack([torch.sigmoid(logit) for logit, _ in outputs], 1)
        gap = torch.stack([g for _, g in outputs], 1)
        return p_metal.double().numpy(), gap.double().numpy()


def save_head(head: GapHead, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, out_dir / HEAD_WEIGHTS_FILE)
    (out_dir / HEAD_CONFIG_FILE).write_text(json.dumps(asdict(head.config), indent=1) + "\n")


def load_head(model_dir: Path) -> GapHead:
    """Load a head written by `save_head` (CPU, eval mode); ValueError when the weights and the
    config do not fit (e.g. a head from before atom pooling)."""
    head = GapHead(HeadConfig(**json.loads((Path(model_dir) / HEAD_CONFIG_FILE).read_text())))
    try:
        head.load_state_dict(load_file(Path(model_dir) / HEAD_WEIGHTS_FILE))
    except RuntimeError as error:
        raise ValueError(f"{model_dir}: the band-gap head's weights do not fit its config; retrain it "
                         f"(python -m crystallm_core.chem.judges.surrogates.train_head): {str(error)[:200]}") from None
    return head.eval()
