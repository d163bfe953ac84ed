from unittest.mock import patch

import pytest
import torch
from conftest import tiny_config

from crystallm_core.lm import sampler as sampler_module
from crystallm_core.lm.model import CrystaLLMPKV
from crystallm_core.lm.sampler import (
    SamplingSettings,
    SlotBatch,
    draw,
    filter_logits,
    sample,
    warm_up,
)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return CrystaLLMPKV(tiny_config()).eval()


@pytest.mark.parametrize("native", ["1", "0"])
def test_ragged_cached_forward_matches_the_full_forward(native, monkeypatch):
    """Prefill, decode steps and jump-forward spans of different lengths per row, in one call
    each, give the logits of the reference (uncached) forward, through the native kernel and
    through every way the fallback's `query_groups` splits a step (all rows padded; one token
    each plus a few short spans; spans past SHARED_WIDTH)."""
    monkeypatch.setenv("CRYSTALLM_NATIVE", native)
    model = tiny_model()
    ids = torch.randint(0, 370, (3, 40))
    cond = torch.tensor([[0.3, 0.1], [0.5, 0.0], [0.1, 0.9]])
    with torch.no_grad():
        full = model.prefix_attention_forward(ids, cond)
        cache = model.setup_cache(3, 64)
        cache.write_prefix(torch.arange(3), model.conditioning(cond))
        fed = [0, 0, 0]
        for counts in ([5, 1, 8], [1, 1, 1], [3, 7, 2], [4, 4, 1], [12, 1, 2], [1, 10, 1], [1, 3, 1]):
            tokens = torch.cat([ids[row, fed[row]:fed[row] + n] for row, n in enumerate(counts)])
            logits = model.forward_cached(tokens, torch.tensor(counts), cache)
            for row, n in enumerate(counts):
                fed[row] += n
                assert torch.allclose(logits[row], full[row, fed[row] - 1], atol=1e-4)
    assert cache.lengths.tolist() == [2 + n for n in fed]


def test_same_seed_same_samples_and_different_seed_differs():
    model = tiny_model()
    settings = SamplingSettings(batch_size=3, max_tokens=40)
    run = lambda seed: [s.token_ids for s in sample(model, [372, 142], [0.3, 0.0], [True, True], 7, settings, seed)]
    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("constrained", [False, True])
def test_a_sample_does_not_depend_on_the_batch_size(constrained):
    """Each sample draws from its own stream: 1, 3 or 6 slots give the same samples (so a batch
    size measured per machine changes no result)."""
    from crystallm_core.chem.decoding.constraints import CifConstraint, CifTokens
    from crystallm_core.lm.tokenizer import get_tokenizer

    model = tiny_model()
    tokens = CifTokens(get_tokenizer())
    factory = (lambda: CifConstraint(tokens)) if constrained else None
    prompt = get_tokenizer().encode("<bos>\ndata_[")

    def run(batch_size, head_start=0):
        settings = SamplingSettings(batch_size=batch_size, max_tokens=60)
        return [s.token_ids for s in sample(model, prompt, [0.3, 0.0], [True, True], 6, settings, 5,
                                            constraint_factory=factory, head_start=head_start)]
    assert run(1) == run(3) == run(6) == run(6, head_start=2)


def test_a_head_start_runs_few_slots_until_the_first_sample_ends():
    model = tiny_model()
    events = []
    original = SlotBatch.place

    def place(batch, slot, sample_):
        events.append(("start", sample_.index))
        original(batch, slot, sample_)

    settings = SamplingSettings(batch_size=6, max_tokens=30, top_k=None, top_p=None)
    with patch.object(SlotBatch, "place", place):
        samples = sample(model, [372, 142], [0.3, 0.0], [True, True], 9, settings, seed=0, head_start=2,
                         on_finished=lambda done: events.append(("end", done.index)))
    assert [s.index for s in samples] == list(range(9))
    first_end = events.index(next(e for e in events if e[0] == "end"))
    assert events[:first_end] == [("start", 0), ("start", 1)]
    # then the batch fills: the freed slot and the four that waited, before anything else ends
    assert events[first_end + 1 : first_end + 6] == [("start", i) for i in range(2, 7)]


def test_draw_lands_only_on_tokens_with_probability():
    probabilities = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0]])
    for u in (0.0, 0.2999, 0.3, 0.5, 0.999999, 1.0 - 2 ** -24):
        tokens = draw(probabilities, torch.full((3,), u))
        assert all(probabilities[row, token] > 0 for row, token in enumerate(tokens.tolist()))
    assert draw(probabilities, torch.tensor([0.1, 0.5, 0.9])).tolist() == [1, 2, 1]


def test_slots_are_recycled_and_every_sample_is_streamed():
    model = tiny_model()
    streamed = []
    settings = SamplingSettings(batch_size=2, max_tokens=30, top_k=None, top_p=None)
    samples = sample(model, [372, 142], [0.3, 0.0], [True, True], 5, settings, seed=0, on_finished=streamed.append)
    assert [s.index for s in samples] == [0, 1, 2, 3, 4]
    assert sorted(s.index for s in streamed) == [0, 1, 2, 3, 4]
    assert all(s.stop_reason in ("eos", "length") and len(s.token_ids) <= 30 for s in samples)
    assert all(s.token_ids[:2] == [372, 142] for s in samples)


def test_cancel_keeps_finished_samples():
    model = tiny_model()
    streamed = []
    settings = SamplingSettings(batch_size=1, max_tokens=12)
    samples = sample(model, [372], [0.3, 0.0], [True, True], 10, settings, seed=0,
                     on_finished=streamed.append, should_cancel=lambda: len(streamed) >= 2)
    assert len(samples) == 2 and samples == streamed


def test_guidance_mixes_conditional_and_unconditional_logits():
    """Scale 0 samples exactly what the unconditional model (every property unknown) samples;
    a large scale samples something else than no guidance."""
    model = tiny_model()
    settings = lambda scale: SamplingSettings(batch_size=3, max_tokens=20, guidance_scale=scale)  # noqa: E731
    tokens = lambda samples: [s.token_ids for s in samples]  # noqa: E731
    unconditional = sample(model, [372, 142], [0.0, 0.0], [False, False], 3, settings(1.0), seed=3)
    scale_zero = sample(model, [372, 142], [0.9, 0.1], [True, True], 3, settings(0.0), seed=3)
    assert tokens(scale_zero) == tokens(unconditional)
    with torch.no_grad():  # a random encoder barely moves the logits: make the targets matter
        model.conditioning.to_kv.weight.mul_(50.0)
    plain = sample(model, [372, 142], [0.9, 0.1], [True, True], 3, settings(1.0), seed=3)
    strong = sample(model, [372, 142], [0.9, 0.1], [True, True], 3, settings(8.0), seed=3)
    assert tokens(strong) != tokens(plain)


def test_guidance_on_one_target_contrasts_with_only_that_target_unknown():
    """guide="e_hull" at scale 0 samples what the model samples with E_hull unknown and the band
    gap still given; a bad guide name is refused."""
    model = tiny_model()
    with torch.no_grad():
        model.conditioning.to_kv.weight.mul_(50.0)
    settings = lambda scale, guide: SamplingSettings(batch_size=3, max_tokens=20, guidance_scale=scale, guide=guide)  # noqa: E731
    tokens = lambda samples: [s.token_ids for s in samples]  # noqa: E731
    gap_only = sample(model, [372, 142], [0.9, 0.0], [True, False], 3, settings(1.0, "all"), seed=3)
    assert tokens(sample(model, [372, 142], [0.9, 0.1], [True, True], 3, settings(0.0, "e_hull"), seed=3)) == tokens(gap_only)
    assert tokens(sample(model, [372, 142], [0.9, 0.1], [True, True], 3, settings(0.0, "all"), seed=3)) != tokens(gap_only)
    with pytest.raises(ValueError, match="guide must be one of"):
        SamplingSettings(guide="density").validate()


def test_banned_tokens_are_never_sampled():
    model = tiny_model()
    samples = sample(model, [372], [0.5, 0.0], [True, True], 4, SamplingSettings(max_tokens=40, top_k=None, top_p=None), seed=0)
    assert not any(t in (370, 371, 372, 376) for s in samples for t in s.token_ids[1:])


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    top2 = filter_logits(logits, SamplingSettings(top_k=2, top_p=None))
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    nucleus = filter_logits(logits, SamplingSettings(top_k=None, top_p=0.5))
    assert torch.isfinite(nucleus[0, 0]) and torch.isinf(nucleus[0, 1:]).all()


def test_warm_up_keeps_the_faster_thread_count():
    model = tiny_model()
    before = torch.get_num_threads()
    try:
        result = warm_up(model)
        # the times come back rounded to 0.01 ms: two thread counts can tie there (0.59 / 0.59 ms)
        step_ms = result["step_ms"]
        assert set(step_ms) >= {1} and step_ms[result["threads"]] <= min(step_ms.values()) + 0.01
        assert torch.get_num_threads() == result["threads"]
        # the default batch size: the smallest within BATCH_TOLERANCE of the best rows per second
        speed = {rows: rows / ms for rows, ms in result["batch_ms"].items()}
        rounding = 0.01 / min(result["batch_ms"].values())  # relative error of the rounded times, at most
        tolerance = sampler_module.BATCH_TOLERANCE * max(speed.values())
        assert result["batch_size"] == sampler_module.measured_batch_size
        assert speed[result["batch_size"]] >= tolerance * (1 - 2 * rounding)
        assert all(speed[rows] < tolerance * (1 + 2 * rounding) for rows in speed if rows < result["batch_size"])
    finally:
        torch.set_num_threads(before)
        sampler_module.measured_batch_size = sampler_module.DEFAULT_BATCH_SIZE


def test_padding_queries_never_look_past_their_row():
    """A row one token from the end of the cache, batched with a row feeding six: its padding
    must not ask for positions past the capacity (a shape error failed whole runs, issue 9)."""
    from crystallm_core.lm.kv_cache import RowQueries

    queries = RowQueries.padded(torch.tensor([0, 1]), torch.tensor([1, 6]), torch.tensor([65, 10]), 0, 6, None)
    assert queries.span == 66  # row 0 sees positions 0…65, its padding no further; row 1 sees 0…15
    assert queries.real.tolist() == [[True] + [False] * 5, [True] * 6]


def test_cache_memory_starts_zeroed():
    from crystallm_core.lm.kv_cache import StaticKVCache

    cache = StaticKVCache(2, 3, 2, 8, 4, torch.bfloat16, torch.device("cpu"))
    assert all(bool((layer == 0).all()) for layer in cache.keys + cache.values)
