"""CHGNet features for the gap head: every layer's atom features, read by hooks in one forward pass."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from prototypes import all_prototypes, fcc_cu, rocksalt_nacl
from pymatgen.core import Lattice, Structure

from crystallm_core.chem.judges import stability
from crystallm_core.chem.judges.chgnet_features import (
    ATOM_FEATURE_DIM,
    CHGNET_FEATURE_DIM,
    POOLED_LAYERS,
    LayerCapture,
    chgnet_feature_names,
)


def test_a_batch_reads_as_each_structure_alone():
    structures = list(all_prototypes().values())
    batched = stability.static_readings(structures, batch_size=4)  # several batches, odd sizes
    for structure, reading in zip(structures, batched):
        [alone] = stability.static_readings([structure])
        assert reading.features.crystal.shape == (len(chgnet_feature_names()),)
        assert reading.features.atoms.shape == (len(structure), ATOM_FEATURE_DIM)
        assert reading.features.crystal == pytest.approx(alone.features.crystal, rel=1e-4, abs=1e-5)
        assert reading.features.atoms == pytest.approx(alone.features.atoms, rel=1e-4, abs=1e-5)
        assert reading.energy_per_atom == pytest.approx(alone.energy_per_atom, abs=1e-5)


def test_hooks_read_the_atom_features_chgnet_itself_returns():
    model = stability.load_chgnet()
    capture = LayerCapture(model)
    structures = [rocksalt_nacl(), fcc_cu()]
    with stability.quiet_chgnet(), capture.capture():
        predictions = model.predict_structure(structures, task="e", return_atom_feas=True)
    per_structure = capture.per_structure([len(s) for s in structures])
    assert len(per_structure) == 2 and len(per_structure[0]) == len(POOLED_LAYERS)
    for layers, prediction, structure in zip(per_structure, predictions, structures):
        assert all(layer.shape == (len(structure), CHGNET_FEATURE_DIM) for layer in layers)
        conv3 = POOLED_LAYERS.index("conv3")  # CHGNet's return_atom_feas: after the penultimate conv
        assert layers[conv3] == pytest.approx(prediction["atom_fea"], abs=1e-5)
    for module in capture.modules:
        assert not module._forward_hooks  # removed after the pass


def test_atom_features_are_every_layer_side_by_side_and_pool_to_the_crystal_vector():
    [reading] = stability.static_readings([rocksalt_nacl()])
    names = chgnet_feature_names()
    atoms = reading.features.atoms
    for k, layer in enumerate(POOLED_LAYERS):
        block = atoms[:, k * CHGNET_FEATURE_DIM:(k + 1) * CHGNET_FEATURE_DIM]
        for stat, pooled in (("mean", block.mean(axis=0)), ("max", block.max(axis=0))):
            first = names.index(f"chgnet_{layer}_{stat}_0")
            assert reading.features.crystal[first:first + CHGNET_FEATURE_DIM] == pytest.approx(pooled, abs=1e-5)


def test_a_bad_structure_fails_alone_and_keeps_the_batch():
    lonely = Structure(Lattice.cubic(30.0), ["Na"], [[0, 0, 0]])  # no neighbour within CHGNet's cutoff
    readings = stability.static_readings([rocksalt_nacl(), lonely, fcc_cu()])
    assert not isinstance(readings[0], str) and not isinstance(readings[2], str)
    assert isinstance(readings[1], str) and readings[1].startswith("CHGNet failed")
    assert np.isfinite(readings[0].features.crystal).all() and np.isfinite(readings[0].features.atoms).all()


def test_capture_refuses_sizes_that_do_not_add_up():
    model = stability.load_chgnet()
    capture = LayerCapture(model)
    with stability.quiet_chgnet(), capture.capture():
        model.predict_structure([rocksalt_nacl()], task="e")
    with pytest.raises(ValueError, match="site counts"):
        capture.per_structure([len(rocksalt_nacl()) + 1])


def test_the_static_reading_says_how_far_from_equilibrium_a_structure_sits():
    """Forces and stress from the same pass: CHGNet's own force reading agrees, and a squeezed cell
    reads far from equilibrium where the relaxed-like one does not."""
    squeezed, displaced = rocksalt_nacl(), rocksalt_nacl()
    squeezed.scale_lattice(squeezed.volume * 0.8)
    displaced.translate_sites([0], [0.03, 0.0, 0.0])
    model = stability.load_chgnet()
    relaxed_like, small, moved = stability.static_readings([rocksalt_nacl(), squeezed, displaced])
    assert relaxed_like.features.force_rms < 0.05 and relaxed_like.features.stress_max < 2.0
    assert small.features.stress_max > 5.0  # GPa: squeezed by a fifth of its volume
    with stability.quiet_chgnet():
        forces = model.predict_structure(displaced, task="ef")["f"]
    assert moved.features.force_rms == pytest.approx(np.sqrt((forces ** 2).sum(1).mean()), rel=1e-3)


def test_readings_work_inside_a_callers_inference_mode():
    """The app samples and scores under torch.inference_mode: the backward pass must still run."""
    with torch.inference_mode():
        [reading] = stability.static_readings([rocksalt_nacl()])
    assert not isinstance(reading, str) and np.isfinite(reading.features.force_rms)


def test_chgnet_first_loaded_inside_a_callers_inference_mode_still_reads_forces():
    """The app may load its judges while sampling under inference mode: weights made there would be
    inference tensors, and every later reading failed ("Inference tensors cannot be saved for backward")."""
    stability.load_chgnet.cache_clear()
    try:
        with torch.inference_mode():
            stability.load_chgnet()
            [inside] = stability.static_readings([rocksalt_nacl()])
        [outside] = stability.static_readings([rocksalt_nacl()])
    finally:
        stability.load_chgnet.cache_clear()
    for reading in (inside, outside):
        assert not isinstance(reading, str), reading
        assert np.isfinite(reading.features.force_rms)
