"""Crystal graph network for band gaps (plain torch; no pymatgen so it trains anywhere).

CGCNN-style message passing over k-nearest-neighbour graphs, with the edge-gated residual
convolution of ALIGNN (Choudhary & DeCost 2021) instead of CGCNN's sigmoid-gated sum: edges
carry their own state that is updated each layer, which is noticeably more accurate than
CGCNN at the same size. No angles / line graph, to stay fast on CPU.

Two heads on the mean-pooled crystal vector: a metal logit and the gap a non-metal would have.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "gnn.safetensors"
CONFIG_FILE = "gnn_config.json"


@dataclass
class GNNConfig:
    n_elements: int = 104  # rows of the element table (index = atomic number)
    element_dim: int = 25  # tabulated properties per element
    hidden: int = 128
    n_layers: int = 4
    n_rbf: int = 40
    cutoff: float = 8.0  # Å; graph settings are stored so inference builds the same graphs
    max_neighbors: int = 12


class GraphBatch(NamedTuple):
    atomic_numbers: torch.Tensor  # (N,) long
    src: torch.Tensor  # (E,) long, global node index
    dst: torch.Tensor  # (E,) long
    distances: torch.Tensor  # (E,) float
    graph_index: torch.Tensor  # (N,) long, which crystal each atom belongs to
    n_graphs: int


class GraphStore:
    """Many graphs as flat tensors (CSR pointers) that hand out batches without Python loops."""

    def __init__(self, arrays: dict[str, np.ndarray], device: str | torch.device = "cpu"):
        def tensor(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.asarray(arrays[name])).to(device=device, dtype=dtype)

        self.atomic_numbers = tensor("atomic_numbers", torch.long)
        self.src, self.dst = tensor("src", torch.long), tensor("dst", torch.long)
        self.distances = tensor("distances", torch.float32)
        self.node_ptr, self.edge_ptr = tensor("node_ptr", torch.long), tensor("edge_ptr", torch.long)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.node_ptr) - 1

    @staticmethod
    def ranges(ptr: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated arange(ptr[i], ptr[i+1]) for i in index, and each element's batch position."""
        start, count = ptr[index], ptr[index + 1] - ptr[index]
        owner = torch.repeat_interleave(torch.arange(len(index), device=ptr.device), count)
        offset_in_batch = torch.cumsum(count, 0) - count
        return start[owner] + torch.arange(int(count.sum()), device=ptr.device) - offset_in_batch[owner], owner

    def batch(self, index: torch.Tensor) -> GraphBatch:
        """Gather the graphs `index` into one disjoint-union graph."""
        index = index.to(self.device)
        nodes, node_owner = self.ranges(self.node_ptr, index)
        edges, edge_owner = self.ranges(self.edge_ptr, index)
        n_nodes = self.node_ptr[index + 1] - self.node_ptr[index]
        node_offset = (torch.cumsum(n_nodes, 0) - n_nodes)[edge_owner]  # shift local edge ids
        return GraphBatch(self.atomic_numbers[nodes], self.src[edges] + node_offset,
                          self.dst[edges] + node_offset, self.distances[edges], node_owner, len(index))


def segment_sum(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Sum rows of `values` into `n` buckets given by `index`."""
    return torch.zeros((n, *values.shape[1:]), dtype=values.dtype, device=values.device).index_add_(0, index, values)


class EdgeGatedConv(nn.Module):
    """Residual edge-gated graph convolution (Bresson & Laurent 2017, as used in ALIGNN)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.src_gate, self.dst_gate, self.edge_gate = (nn.Linear(hidden, hidden) for _ in range(3))
        self.self_update, self.neighbour_update = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.node_norm, self.edge_norm = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

    def forward(self, h: torch.Tensor, e: torch.Tensor, src: torch.Tensor, dst: torch.Tensor):
        # Node-side projections are computed once per atom and gathered, not once per edge.
        gate_logits = self.src_gate(h)[src] + self.dst_gate(h)[dst] + self.edge_gate(e)
        gate = torch.sigmoid(gate_logits)
        messages = segment_sum(gate * self.neighbour_update(h)[src], dst, len(h))
        normaliser = segment_sum(gate, dst, len(h)) + 1e-6
        h = h + nn.functional.silu(self.node_norm(self.self_update(h) + messages / normaliser))
        e = e + nn.functional.silu(self.edge_norm(gate_logits))
        return h, e


class CrystalGNN(nn.Module):
    def __init__(self, config: GNNConfig, element_features: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        # Standardised element properties give rare elements a sensible start; the learned
        # per-element embedding on top lets common ones specialise.
        table = torch.zeros(config.n_elements, config.element_dim) if element_features is None else element_features
        self.register_buffer("element_features", table.float())
        self.element_projection = nn.Linear(config.element_dim, config.hidden)
        self.element_embedding = nn.Embedding(config.n_elements, config.hidden)
        nn.init.zeros_(self.element_embedding.weight)
        self.register_buffer("rbf_centres", torch.linspace(0.0, config.cutoff, config.n_rbf))
        self.rbf_gamma = (config.n_rbf / config.cutoff) ** 2
        self.edge_embedding = nn.Sequential(nn.Linear(config.n_rbf, config.hidden), nn.SiLU(),
                                            nn.Linear(config.hidden, config.hidden))
        self.convs = nn.ModuleList(EdgeGatedConv(config.hidden) for _ in range(config.n_layers))
        self.head = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.SiLU(), nn.Linear(config.hidden, 2))

    def forward(self, batch: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (metal logit, gap if non-metal in eV), each of shape (n_graphs,)."""
        z = batch.atomic_numbers
        h = self.element_projection(self.element_features[z]) + self.element_embedding(z)
        rbf = torch.exp(-self.rbf_gamma * (batch.distances[:, None] - self.rbf_centres) ** 2)
        e = self.edge_embedding(rbf)
        for conv in self.convs:
            h, e = conv(h, e, batch.src, batch.dst)
        counts = torch.bincount(batch.graph_index, minlength=batch.n_graphs).clamp(min=1)
        crystal = segment_sum(h, batch.graph_index, batch.n_graphs) / counts[:, None]
        out = self.head(crystal)
        return out[:, 0], nn.functional.softplus(out[:, 1])


@torch.no_grad()
def predict_gap(model: CrystalGNN, store: GraphStore, index: np.ndarray,
                batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(P(metal), gap if non-metal) as float64 arrays for the graphs `index` of `store`."""
    model.eval()
    p_metal, gap = [], []
    for start in range(0, len(index), batch_size):
        logit, g = model(store.batch(torch.as_tensor(index[start:start + batch_size])))
        p_metal.append(torch.sigmoid(logit).cpu())
        gap.append(g.cpu())
    return torch.cat(p_metal).double().numpy(), torch.cat(gap).double().numpy()


def standardise(table: np.ndarray) -> np.ndarray:
    """Column z-scores of the element table (row 0, the unused Z=0, included; it is never looked up)."""
    return (table - table[1:].mean(0)) / (table[1:].std(0) + 1e-6)


def save_gnn(model: CrystalGNN, out_dir: Path) -> None:
    """Write gnn.safetensors (weights + element table) and gnn_config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out_dir / WEIGHTS_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=1))


def load_gnn(model_dir: Path) -> CrystalGNN:
    """Load a model written by `save_gnn` (CPU, eval mode)."""
    config = GNNConfig(**json.loads((Path(model_dir) / CONFIG_FILE).read_text()))
    model = CrystalGNN(config)
    model.load_state_dict(load_file(Path(model_dir) / WEIGHTS_FILE))
    return model.eval()
