"""Crystal graphs: atoms are nodes, the k nearest periodic neighbours within a cutoff are edges.

Also a command that turns the band-gap rows of the dataset into one compressed npz, so that the
graph network can be trained on a machine without pymatgen (see train_gnn.py):

    nice -n 10 python -m crystallm_core.chem.judges.surrogates.graphs --out data/cache/surrogate_graphs.npz
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from crystallm_core.chem.judges.surrogates.features import (
    ELEMENT_PROPERTIES,
    MAX_Z,
    element_table,
)
from crystallm_core.paths import cache_dir


@dataclass
class GraphConfig:
    cutoff: float = 8.0  # Å; CGCNN's radius
    max_neighbors: int = 12  # nearest neighbours kept per atom, as in CGCNN


@dataclass
class CrystalGraph:
    atomic_numbers: np.ndarray  # (n_atoms,) int
    src: np.ndarray  # (n_edges,) neighbour index: messages flow src -> dst
    dst: np.ndarray  # (n_edges,) centre index
    distances: np.ndarray  # (n_edges,) float32, Å


def structure_to_graph(structure: Structure, config: GraphConfig = GraphConfig()) -> CrystalGraph:
    """Build the k-nearest-neighbour graph of a periodic structure (ValueError if unsupported)."""
    if not structure.is_ordered:
        raise ValueError("disordered structure (partial occupancies) is not supported")
    z = np.array(structure.atomic_numbers, dtype=np.int64)
    if len(z) == 0 or z.max() > MAX_Z:
        raise ValueError(f"unsupported element (Z > {MAX_Z}) or empty structure")
    centres, neighbours, _, distances = structure.get_neighbor_list(config.cutoff)
    # Sort by (centre, distance) and keep each centre's first max_neighbors entries.
    order = np.lexsort((distances, centres))
    centres, neighbours, distances = centres[order], neighbours[order], distances[order]
    first = np.searchsorted(centres, centres, side="left")
    keep = np.arange(len(centres)) - first < config.max_neighbors
    return CrystalGraph(z, neighbours[keep].astype(np.int64), centres[keep].astype(np.int64),
                        distances[keep].astype(np.float32))


def graph_of_cif(args: tuple[str, GraphConfig]) -> CrystalGraph | str:
    """Worker: CIF text -> graph, or the failure reason as a string."""
    cif, config = args
    warnings.filterwarnings("ignore")  # pymatgen's CIF rounding notices would flood the log
    try:
        return structure_to_graph(Structure.from_str(cif, fmt="cif"), config)
    except Exception as error:  # any unreadable row is reported and skipped, never fatal
        return f"{type(error).__name__}: {error}"


def pack_graphs(graphs: list[CrystalGraph]) -> dict[str, np.ndarray]:
    """Concatenate graphs into flat arrays with CSR-style pointers (edge indices stay local)."""
    n_nodes = [len(g.atomic_numbers) for g in graphs]
    n_edges = [len(g.src) for g in graphs]
    return {
        "atomic_numbers": np.concatenate([g.atomic_numbers for g in graphs]).astype(np.uint8),
        "node_ptr": np.concatenate([[0], np.cumsum(n_nodes)]).astype(np.int64),
        "src": np.concatenate([g.src for g in graphs]).astype(np.int16),
        "dst": np.concatenate([g.dst for g in graphs]).astype(np.int16),
        "distances": np.concatenate([g.distances for g in graphs]).astype(np.float32),
        "edge_ptr": np.concatenate([[0], np.cumsum(n_edges)]).astype(np.int64),
    }


def build_graph_file(dataset: Path, out: Path, config: GraphConfig, workers: int) -> dict:
    """Graph every band-gap row of `dataset` (parquet) into `out` (npz); return a summary."""
    import pandas as pd  # only the build step needs pandas

    table = pd.read_parquet(dataset, columns=["id", "source", "reduced_formula", "band_gap", "split", "cif"])
    table = table[table.band_gap.notna()].reset_index(drop=True)
    start = time.time()
    with Pool(workers) as pool:
        results = pool.map(graph_of_cif, [(cif, config) for cif in table.cif], chunksize=64)
    seconds = time.time() - start
    ok = [i for i, r in enumerate(results) if not isinstance(r, str)]
    failures = {table.id[i]: r for i, r in enumerate(results) if isinstance(r, str)}
    rows = table.iloc[ok]
    arrays = pack_graphs([results[i] for i in ok])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out, **arrays,
        band_gap=rows.band_gap.to_numpy(np.float32),
        split=rows.split.to_numpy(str), source=rows.source.to_numpy(str), ids=rows.id.to_numpy(str),
        element_features=element_table(), element_feature_names=np.array(ELEMENT_PROPERTIES),
        graph_config=np.array(json.dumps(asdict(config))),
    )
    return {"graphs": len(ok), "failed": len(failures), "failures": dict(list(failures.items())[:20]),
            "edges": int(arrays["edge_ptr"][-1]), "seconds": round(seconds, 1), "workers": workers,
            "ms_per_structure_per_worker": round(1000 * seconds * workers / max(len(table), 1), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description="Precompute crystal graphs for GNN training.")
    parser.add_argument("--dataset", type=Path, default=cache_dir() / "dataset.parquet")
    parser.add_argument("--out", type=Path, default=cache_dir() / "surrogate_graphs.npz")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cutoff", type=float, default=GraphConfig.cutoff)
    parser.add_argument("--max-neighbors", type=int, default=GraphConfig.max_neighbors)
    args = parser.parse_args()
    summary = build_graph_file(args.dataset, args.out, GraphConfig(args.cutoff, args.max_neighbors), args.workers)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
