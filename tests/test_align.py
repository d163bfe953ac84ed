"""Reward fine-tuning: the examples each signal makes, and a real (tiny) resumable run."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from prototypes import rocksalt_nacl, rutile_tio2

from crystallm_core.lm.checkpoints import load_model_weights
from crystallm_core.lm.tokenizer import get_tokenizer
from crystallm_core.product.align import add_rewards, align, collapse_reason
from crystallm_core.product.align_examples import encoded_samples, preference_pairs, round_examples, usable_rows
from crystallm_core.product.align_report import pooled_vun, prototype_variety
from crystallm_core.product.align_settings import AlignSettings, AlignSignals, region_grid, round_cells, target_cells


def judged_frame():
    frame = pd.DataFrame({
        "valid": [True, True, False], "unique": [True, True, None],
        "band_gap_target": [3.72, 3.72, 3.72], "e_hull_target": [0.0, 0.0, 0.0],
        "band_gap_pred": [3.1, 0.0, None], "band_gap_std": [0.3, 0.2, None], "p_metal": [0.1, 0.9, None],
        "e_hull_pred": [0.05, 1.7, None], "reward": [0.8, 0.05, 0.0],
        "formula": ["TiO2", "NaCl", None], "space_group": ["P4_2/mnm", "Fm-3m", None],
    })
    candidates = [SimpleNamespace(structure=rutile_tio2()), SimpleNamespace(structure=rocksalt_nacl()),
                  SimpleNamespace(structure=None)]
    return frame, candidates


def test_each_signal_makes_its_examples():
    frame, candidates = judged_frame()
    relaxed = [{"valid": True, "structure": rocksalt_nacl(), "e_hull_pred": 0.02, "band_gap_pred": 4.9}]
    settings = AlignSettings(keep_best=0.5, min_reward=0.3)
    tokens = encoded_samples(frame, candidates, get_tokenizer(), 1024)
    examples = round_examples(frame, tokens, relaxed, get_tokenizer(), settings, 1024)
    by_signal = {s: [e for e in examples if e.signal == s] for s in ("hindsight", "rejection", "relaxed")}
    # hindsight: every valid, unique sample, labelled with what it reached
    assert [(e.band_gap, e.e_hull) for e in by_signal["hindsight"]] == [(3.1, 0.05), (0.0, 1.7)]
    # rejection: the best half of the cell, only if good enough, labelled with the targets asked for
    assert [(e.band_gap, e.e_hull) for e in by_signal["rejection"]] == [(3.72, 0.0)]
    assert [(e.band_gap, e.e_hull) for e in by_signal["relaxed"]] == [(4.9, 0.02)]
    assert all(e.tokens[0] == get_tokenizer().token_to_id["<bos>"] for e in examples)
    off = AlignSettings(signals=AlignSignals(hindsight=False, rejection=False, relaxed_teachers=False))
    assert round_examples(frame, tokens, relaxed, get_tokenizer(), off, 1024) == []


def test_each_signal_teaches_a_kind_once_per_run():
    frame, candidates = judged_frame()
    tokens = encoded_samples(frame, candidates, get_tokenizer(), 1024)
    only_rejection = AlignSettings(keep_best=0.5, min_reward=0.3,
                                   signals=AlignSignals(hindsight=False, relaxed_teachers=False))
    taught: set[str] = set()
    first = round_examples(frame, tokens, [], get_tokenizer(), only_rejection, 1024, taught)
    assert len(first) == 1 and taught == {"rejection:AB2|P4_2/mnm"}  # rejection remembers the prototype …
    assert round_examples(frame, tokens, [], get_tokenizer(), only_rejection, 1024, taught) == []  # already taught
    snf2 = frame.assign(formula=["SnF2", "NaCl", None])  # … so a rutile of other elements is taught no more
    assert round_examples(snf2, tokens, [], get_tokenizer(), only_rejection, 1024, taught) == []
    hindsight = AlignSettings(signals=AlignSignals(rejection=False, relaxed_teachers=False))
    assert len(round_examples(frame, tokens, [], get_tokenizer(), hindsight, 1024, taught)) == 2
    assert round_examples(frame, tokens, [], get_tokenizer(), hindsight, 1024, taught) == []


def test_preference_pairs_best_against_worst_of_a_cell():
    frame, candidates = judged_frame()
    tokens = encoded_samples(frame, candidates, get_tokenizer(), 1024)
    pairs = preference_pairs(frame, tokens, AlignSettings(pairs_per_cell=2, min_reward_gap=0.2))
    assert len(pairs) == 1  # two usable samples make one pair; the invalid one is never used
    assert np.array_equal(pairs[0].chosen, tokens[0]) and np.array_equal(pairs[0].rejected, tokens[1])
    assert pairs[0].present.all()
    assert preference_pairs(frame, tokens, AlignSettings(min_reward_gap=0.9)) == []  # 0.8 − 0.05 is too close


def test_the_collapse_guard_pools_rounds():
    rounds = [{"n": 64, "valid_unique_novel": 0.9}, {"n": 64, "valid_unique_novel": 0.8}]
    assert pooled_vun(rounds, 2) == pytest.approx(0.85) and pooled_vun(rounds, 1) == pytest.approx(0.8)
    assert pooled_vun(rounds[:1], 2) is None  # one round is too noisy to stop a run on
    assert collapse_reason(None, 0.6, {"first_vun": 0.97, "first_variety": 0.62}, AlignSettings()) is None


def test_rounds_cycle_through_the_target_grid():
    settings = AlignSettings(cells_per_round=9)
    cells = target_cells()
    assert len(cells) == 9 * 5 and (None, None) in cells and (12.145, 0.5) in cells
    seen = {cell for r in range(5) for cell in round_cells(settings, r)}
    assert len(seen) > 20 and round_cells(settings, 3) == round_cells(settings, 3)


def test_a_tiny_run_learns_checkpoints_and_resumes(tmp_path):
    tiny = dict(cells_per_round=1, samples_per_cell=2, relax_per_round=1, replay_per_round=0, free_samples=1,
                min_reward_gap=0.0, signals=AlignSignals(preference=True))
    first = align(tmp_path / "run", settings=AlignSettings(rounds=1, **tiny))
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    report = state["rounds"][0]
    assert report["accepted"] and report["n"] == 2 and 0 <= report["valid"] <= 1
    assert report["prototype_variety"] is None or 0 < report["prototype_variety"] <= 1
    assert report["training"]["steps"] >= 1 or sum(report["examples"].values()) == 0
    assert first == tmp_path / "run" / "round_000" / "model"
    samples = pd.read_csv(tmp_path / "run" / "round_000" / "samples.csv")
    assert len(samples) == 2 and "reward" in samples
    relabelled = pd.read_csv(tmp_path / "run" / "round_000" / "relabelled.csv.gz")  # for prepare-data --align-runs
    assert len(relabelled) == int(usable_rows(samples).sum()) + report["relaxed_n"]
    second = align(tmp_path / "run", settings=AlignSettings(rounds=2, **tiny))  # resumes at round 1
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [0, 1] and second.parent.name == "round_001"
    a = load_model_weights(first, dtype=torch.float32).state_dict()
    base = load_model_weights(state["base"], dtype=torch.float32).state_dict()
    if report["training"]["steps"]:
        assert any(not torch.equal(a[k], base[k]) for k in a if k in base)
    if report["examples"]["preference_pairs"]:  # DPO against the frozen base ran on the pair
        assert report["training"]["dpo_steps"] == 1 and np.isfinite(report["training"]["dpo_loss"])
    assert np.isfinite(state["rounds"][1]["seconds"])


def test_a_target_region_is_its_own_grid_and_required_elements_gate_the_reward():
    grid = region_grid(2.0, 3.0, 0.0)
    assert grid == [(2.0, 0.0), (2.5, 0.0), (3.0, 0.0)] and region_grid(2.0, 2.0, None) == [(2.0, None)]
    settings = AlignSettings(grid=grid, cells_per_round=2)
    assert set(round_cells(settings, 0)) <= set(grid) and len(round_cells(settings, 0)) == 2
    with pytest.raises(ValueError):
        region_grid(3.0, 2.0, 0.0)
    frame, _ = judged_frame()
    rewards = add_rewards(frame, AlignSettings(required_elements=["O"]))["reward"].tolist()
    assert rewards[0] > 0 and rewards[1] == 0 and rewards[2] == 0  # NaCl holds no O; no formula earns nothing


def test_a_stop_while_sampling_drops_the_round(tmp_path):
    calls = []

    def stop_mid_sampling() -> bool:  # the round's check and the cell's pass; then the sampler's steps stop it
        calls.append(1)
        return len(calls) > 5

    settings = AlignSettings(rounds=1, cells_per_round=1, samples_per_cell=2, replay_per_round=0, free_samples=0)
    final = align(tmp_path / "run", settings=settings, should_stop=stop_mid_sampling)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["rounds"] == [] and final == Path(state["base"]) and not (tmp_path / "run" / "round_000").exists()


def test_the_guard_sees_a_collapse_onto_one_prototype_before_exact_repeats():
    elpasolites = pd.DataFrame({"valid": [True] * 4 + [False], "space_group": ["Fm-3m"] * 4 + [None],
                                "formula": ["Cs2NaF6", "K2NaF6", "Rb2LiF6", "TiO2", None]})
    assert prototype_variety(elpasolites) == 0.5  # four formulas, two prototypes (AB2C6, AB2)
    state = {"first_vun": 0.95, "first_variety": 0.62}
    settings = AlignSettings()
    assert collapse_reason(0.94, 0.54, state, settings) is None
    assert "prototype variety" in collapse_reason(0.94, 0.39, state, settings)  # run A's round 2
    assert "valid∧unique∧novel" in collapse_reason(0.85, 0.6, state, settings)


def test_a_repeat_penalty_divides_a_reward_by_its_prototype_count():
    frame, _ = judged_frame()
    frame = pd.concat([frame, frame.iloc[[0]].assign(formula="SnO2")], ignore_index=True)  # a second rutile
    plain = add_rewards(frame, AlignSettings())["reward"].tolist()
    shared = add_rewards(frame, AlignSettings(repeat_penalty=1.0))["reward"].tolist()
    assert shared[0] == pytest.approx(plain[0] / 2) and shared[3] == pytest.approx(plain[3] / 2)
    assert shared[1] == pytest.approx(plain[1]) and shared[2] == 0.0  # a lone prototype, an invalid sample
    with pytest.raises(ValueError):
        AlignSettings(repeat_penalty=-1).validate()
