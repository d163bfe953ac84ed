"""Campaigns that stop each target at a number of valid samples: what is kept does not depend on
how many chunks run at once or in which order they finish."""
from __future__ import annotations

import random

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st
from prototypes import rutile_tio2

from crystallm_core.product import campaign as campaign_module
from crystallm_core.product.campaign import run_campaign
from crystallm_core.product.campaign_plan import ChunkPlan
from crystallm_core.product.campaign_spec import parse_spec


def spec(valid_per_target, samples=20, chunk=4, targets=(0.5, 1.5, 2.5)):
    return parse_spec({"samples_per_target": samples, "chunk_size": chunk, "valid_per_target": valid_per_target,
                       "targets": {"band_gap": list(targets)}, "scores": {"surrogate": False, "stability": False,
                                                                         "novelty": False}})


def sequential(spec_, valid_of) -> list[str]:
    """What one worker keeps: each chunk in turn, as the plan hands them out."""
    plan, kept = ChunkPlan(spec_, {}), []
    while (item := plan.next_item()) is not None:
        kept += [key for key in plan.finished(item, valid_of[item.key], item.key)]
    return kept


@settings(max_examples=60, deadline=None)
@given(wanted=st.integers(1, 12), counts=st.lists(st.integers(0, 4), min_size=15, max_size=15),
       window=st.integers(1, 6), order_seed=st.integers(0, 10_000))
def test_kept_chunks_do_not_depend_on_concurrency_or_order(wanted, counts, window, order_seed):
    spec_ = spec(wanted)
    valid_of = {item.key: counts[i] for i, item in enumerate(spec_.work_items())}
    expected = sequential(spec_, valid_of)
    plan, kept, flying, shuffle = ChunkPlan(spec_, {}), [], [], random.Random(order_seed)
    while True:
        while len(flying) < window and (item := plan.next_item()) is not None:
            flying.append(item)
        if not flying:
            break
        item = flying.pop(shuffle.randrange(len(flying)))  # any of them may finish first
        kept += plan.finished(item, valid_of[item.key], item.key)
    assert sorted(kept) == sorted(expected)
    for target in range(3):  # each target: its first chunks, up to the one that reached the count
        mine = [k for k in expected if k.startswith(f"t{target:04d}")]
        assert mine == [item.key for item in spec_.work_items() if item.target.index == target][:len(mine)]
        held = [valid_of[k] for k in mine]
        assert sum(held) >= wanted or len(mine) == 5  # reached, or the cap of 20 samples was drawn
        assert sum(held[:-1]) < wanted


def test_a_resumed_plan_continues_from_the_chunks_on_disk():
    spec_ = spec(6)
    valid_of = {item.key: 2 for item in spec_.work_items()}
    full = sequential(spec_, valid_of)
    on_disk = {key: 2 for key in full[:4]}
    plan, kept = ChunkPlan(spec_, on_disk), list(on_disk)
    while (item := plan.next_item()) is not None:
        kept += plan.finished(item, valid_of[item.key], item.key)
    assert sorted(kept) == sorted(full) and len(full) == 9  # three chunks of 2 valid per target


def test_samples_per_target_alone_keeps_every_chunk():
    spec_ = parse_spec({"samples_per_target": 8, "chunk_size": 4, "targets": {"band_gap": [1.0]},
                        "scores": {"surrogate": False, "stability": False, "novelty": False}})
    plan = ChunkPlan(spec_, {})
    first, second = plan.next_item(), plan.next_item()
    assert plan.finished(second, 0, "b") == ["b"] and plan.finished(first, 0, "a") == ["a"]
    assert plan.next_item() is None


def test_a_local_campaign_stops_each_target_at_its_valid_count(tmp_path, monkeypatch):
    """The campaign's plumbing with a stand-in sampler whose every third sample is valid."""
    from crystallm_core.chem.judges.validity import CheckResult, ValidityReport
    from crystallm_core.product.run import Candidate

    class StandInSampler:
        def __init__(self, spec_, threads=None):
            self.spec = spec_

        def model_record(self):
            return {"name": "stand-in"}

        def run(self, item):
            candidates = []
            for i in range(item.n):
                valid = (item.chunk * item.n + i) % 3 == 0
                report = ValidityReport([CheckResult("parses", valid, "" if valid else "stand-in")])
                candidates.append(Candidate(i, f"X{i}", cif if valid else None, report, None,
                                            band_gap_target=item.target.band_gap, e_hull_target=0.0))
            return item, candidates

    monkeypatch.setattr(campaign_module, "Sampler", StandInSampler)
    cif = rutile_tio2().to(fmt="cif")
    summary = run_campaign(spec(3, samples=40, chunk=4, targets=(1.0, 2.0)), tmp_path / "c", backend="local",
                           progress=False)
    rows = pd.read_parquet(tmp_path / "c" / "rows")
    # chunks of 4 hold 2, 1, 1, 2, … valid: 3 are reached after two chunks, 8 samples of the cap of 40
    assert rows.groupby("target").size().tolist() == [8, 8] and rows.groupby("target")["valid"].sum().tolist() == [3, 3]
    assert summary["n"].tolist() == [8, 8]
