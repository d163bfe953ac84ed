"""CHGNet's pretrained representation of a structure, as the input of the band-gap head.

CHGNet (trained on 1.5 M MPtrj structures) is run anyway for the stability estimate. Its last
layers are tuned to the energy; its earlier message-passing layers still hold more of the
local chemistry (which elements, which neighbours), and a gap depends on that. So the features
pool the atom features of every layer, not only the penultimate one. Read out of fold on 7,136
WBM (hypothetical) rows, the head's R² went 0.829 -> 0.842 and its MAE on the 1,111 non-metals
0.427 -> 0.419 eV; on MP non-metals 0.409 -> 0.392 (surrogate model card). Forward hooks read
them during the one forward pass the stability estimate makes; the pass took as long with them
as without (within its noise).

The head also reads each atom's features (every layer side by side, `ChgnetFeatures.atoms`) and
learns its own attention pooling over them (head.py): which atoms matter for a gap (the anion,
the transition metal) is something mean / max / std cannot pick out.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

CHGNET_FEATURE_DIM = 64  # CHGNet 0.4.2 atom / crystal feature width
POOLED_LAYERS = ("embedding", "conv1", "conv2", "conv3", "conv4")  # atom features after each
POOLINGS = ("mean", "max", "std")
ATOM_FEATURE_DIM = CHGNET_FEATURE_DIM * len(POOLED_LAYERS)  # one atom: every layer's features side by side


@dataclass
class ChgnetFeatures:
    """What the band-gap head reads from one structure's CHGNet forward pass."""

    crystal: np.ndarray  # (len(chgnet_feature_names()),) float32, see `crystal_features`
    atoms: np.ndarray  # (n_sites, ATOM_FEATURE_DIM) float32
    # How far from equilibrium CHGNet reads the structure (NaN: not read, e.g. an older cache).
    # Relaxed structures sit near zero; the unrelaxed ones a generative model writes, far from it.
    force_rms: float = float("nan")  # eV/Å, root mean square over the atoms
    stress_max: float = float("nan")  # GPa, the largest stress component in magnitude


def chgnet_feature_names() -> list[str]:
    """Names of `crystal_features`: crystal_fea, the pooled atom features of every layer, the energies."""
    dims = range(CHGNET_FEATURE_DIM)
    pooled = [f"chgnet_{layer}_{stat}_{d}" for layer in POOLED_LAYERS for stat in POOLINGS for d in dims]
    return [f"chgnet_crystal_{d}" for d in dims] + pooled + ["chgnet_energy_per_atom", "chgnet_e_form_per_atom"]


class LayerCapture:
    """Atom features after CHGNet's embedding and each conv layer, for every structure of the
    forward passes made inside `capture()` (batched or not: passes keep their order)."""

    def __init__(self, model: torch.nn.Module):
        self.modules = [model.atom_embedding, *model.atom_conv_layers]
        if len(self.modules) != len(POOLED_LAYERS):
            raise ValueError(f"expected CHGNet with {len(POOLED_LAYERS) - 1} conv layers, got {len(self.modules) - 1}")
        self.outputs: list[list[torch.Tensor]] = [[] for _ in self.modules]

    @contextlib.contextmanager
    def capture(self) -> Iterator[LayerCapture]:
        for outputs in self.outputs:
            outputs.clear()
        hooks = [module.register_forward_hook(lambda _m, _i, out, kept=kept: kept.append(out.detach()))
                 for module, kept in zip(self.modules, self.outputs)]
        try:
            yield self
        finally:
            for hook in hooks:
                hook.remove()

    def per_structure(self, sizes: Sequence[int]) -> list[list[np.ndarray]]:
        """[structure][layer] -> (n_sites, 64) atom features, for structures of these site counts."""
        layers = [torch.cat(outputs).float().numpy() for outputs in self.outputs]
        if any(len(layer) != sum(sizes) for layer in layers):
            raise ValueError("captured atom features do not match the structures' site counts")
        bounds = np.cumsum([0, *sizes])
        return [[layer[start:end] for layer in layers] for start, end in zip(bounds[:-1], bounds[1:])]


def crystal_features(crystal_fea: np.ndarray, layers: Sequence[np.ndarray], energy: float,
                     e_form: float) -> np.ndarray:
    """One structure's feature vector (float32, see `chgnet_feature_names`); e_form may be NaN."""
    pooled = [stat(atoms, axis=0) for atoms in layers for stat in (np.mean, np.max, np.std)]
    return np.concatenate([np.asarray(crystal_fea).reshape(-1), *pooled, [energy, e_form]]).astype(np.float32)


def structure_features(crystal_fea: np.ndarray, layers: Sequence[np.ndarray], energy: float,
                       e_form: float, forces: np.ndarray | None = None,
                       stress: np.ndarray | None = None) -> ChgnetFeatures:
    """The crystal vector and the atom features of one structure (`layers`: [layer] -> (n_sites, 64)),
    with how far from equilibrium its forces (n_sites, 3) and stress (GPa) put it, when given."""
    force_rms = float("nan") if forces is None else float(np.sqrt((np.asarray(forces) ** 2).sum(axis=1).mean()))
    stress_max = float("nan") if stress is None else float(np.abs(stress).max())
    return ChgnetFeatures(crystal_features(crystal_fea, layers, energy, e_form),
                          np.hstack(layers).astype(np.float32), force_rms, stress_max)
