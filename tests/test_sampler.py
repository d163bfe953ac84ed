import torch

from conftest import tiny_config
from crystallm_core.model import CrystaLLMPKV
from crystallm_core.sampler import SamplingSettings, SlotBatch, filter_logits, sample


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return CrystaLLMPKV(tiny_config()).eval()


def test_static_cache_steps_match_the_full_forward():
    model = tiny_model()
    ids = torch.randint(0, 370, (1, 14))
    cond = torch.tensor([[0.3, 0.1]])
    with torch.no_grad():
        full = model.prefix_attention_forward(ids, cond)
        batch = SlotBatch(model, 1, guided=False, capacity=64)
        batch.write_prefix(torch.tensor([0]), model.conditioning(cond))
        batch.prefill(torch.tensor([0]), ids[0, :6])
        stepped = torch.stack([batch.step(ids[0, t : t + 1])[0] for t in range(6, 14)])
    assert torch.allclose(stepped, full[0, 6:14], atol=1e-4)


def test_same_seed_same_samples_and_different_seed_differs():
    model = tiny_model()
    settings = SamplingSettings(batch_size=3, max_tokens=40)
    run = lambda seed: [s.token_ids for s in sample(model, [372, 142], [0.3, 0.0], [True, True], 7, settings, seed)]
    assert run(1) == run(1)
    assert run(1) != run(2)


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


def test_guidance_and_missing_properties_run():
    model = tiny_model()
    settings = SamplingSettings(batch_size=4, max_tokens=20, guidance_scale=2.0)
    samples = sample(model, [372, 142], [0.0, 0.1], [False, True], 6, settings, seed=3)
    assert len(samples) == 6


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
