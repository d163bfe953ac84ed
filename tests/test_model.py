import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file
from transformers import DynamicCache

from crystallm_core.lm.checkpoints import load_model, save_model
from crystallm_core.lm.model import CrystaLLMPKV, PKVConfig, count_parameters


def test_published_size_has_61_6m_parameters():
    config = PKVConfig(n_layer=8, n_head=8, n_embd=512, n_positions=1026, missing_property_embedding=False)
    assert count_parameters(CrystaLLMPKV(config)) == 61_613_568


def test_conditioning_reaches_the_logits():
    torch.manual_seed(0)
    model = CrystaLLMPKV(tiny_config()).eval()
    with torch.no_grad():  # a trained encoder has large weights; N(0, 0.02) init barely moves the logits
        for parameter in model.conditioning.parameters():
            parameter.normal_(std=0.5)
    ids = torch.randint(0, 370, (1, 10))
    with torch.no_grad():
        low = model.prefix_attention_forward(ids, torch.tensor([[0.0, 0.0]]))
        high = model.prefix_attention_forward(ids, torch.tensor([[0.9, 0.0]]))
        unknown = model.prefix_attention_forward(ids, torch.tensor([[0.0, 0.0]]), torch.tensor([[False, True]]))
    assert (low.log_softmax(-1) - high.log_softmax(-1)).abs().max() > 1e-2
    assert (low.log_softmax(-1) - unknown.log_softmax(-1)).abs().max() > 1e-2


def test_prefix_forward_matches_the_library_cache_path():
    """Our attention step must equal transformers' own GPT-2 with the prefix in a DynamicCache."""
    torch.manual_seed(1)
    config = tiny_config()
    model = CrystaLLMPKV(config).eval()
    ids = torch.randint(0, 370, (2, 16))
    cond = torch.rand(2, 2)
    with torch.no_grad():
        ours = model.prefix_attention_forward(ids, cond)
        cache = DynamicCache(config=config)
        for layer, (k, v) in enumerate(model.conditioning(cond)):
            cache.update(k, v, layer)
        mask = torch.ones(2, 16 + config.n_prefix_tokens, dtype=torch.long)
        theirs = model(input_ids=ids, cache=cache, attention_mask=mask, use_cache=True).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_published_model_refuses_missing_property():
    model = CrystaLLMPKV(tiny_config(missing_property_embedding=False))
    with pytest.raises(ValueError, match="needs every property"):
        model.conditioning(torch.zeros(1, 2), torch.tensor([[True, False]]))


def test_save_load_round_trip(tiny_model_dir):
    loaded = load_model(tiny_model_dir, dtype=torch.float32)
    assert loaded.info.name == "tiny-test-model"
    assert len(loaded.info.weights_sha256) == 64
    assert loaded.info.supports_missing_properties
    original = CrystaLLMPKV(tiny_config())
    assert loaded.info.n_params == count_parameters(original)


def test_shards_stay_under_15_mib(tmp_path):
    model = CrystaLLMPKV(tiny_config(n_embd=256, n_head=4, n_layer=4, n_hidden_cond=512))
    save_model(model, tmp_path)
    shards = list(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and all(s.stat().st_size <= 15 * 2**20 for s in shards)
    load_model(tmp_path)


def write_published_checkpoint(directory, n_layer=2, n_embd=32, n_head=2, hidden=16):
    """A synthetic checkpoint exactly in the CrystaLLM-pi PKVGPT layout (reference §7)."""
    config = {
        "architectures": ["PKVGPT"], "model_type": "gpt2", "vocab_size": 377, "n_positions": 1026,
        "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "bos_token_id": 372, "eos_token_id": 373,
        "pad_token_id": 371, "n_input_vector": 2, "n_prefix_tokens": 2, "n_hidden_cond": hidden,
        "dropout": 0.1, "share_layers": False,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    torch.manual_seed(2)
    tensors = {
        "transformer.wte.weight": torch.randn(377, n_embd) * 0.02,
        "transformer.wpe.weight": torch.randn(1026, n_embd) * 0.02,
        "transformer.ln_f.weight": torch.ones(n_embd), "transformer.ln_f.bias": torch.zeros(n_embd),
        "conditioning.processor.0.weight": torch.randn(hidden, 2), "conditioning.processor.0.bias": torch.zeros(hidden),
        "conditioning.processor.1.weight": torch.ones(hidden), "conditioning.processor.1.bias": torch.zeros(hidden),
        "conditioning.processor.3.weight": torch.randn(2 * hidden, hidden) * 0.1,
        "conditioning.processor.3.bias": torch.zeros(2 * hidden),
        "conditioning.to_kv.weight": torch.randn(n_layer * 2 * 2 * n_embd, 2 * hidden) * 0.1,
        "conditioning.to_kv.bias": torch.zeros(n_layer * 2 * 2 * n_embd),
    }
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        tensors.update({
            p + "ln_1.weight": torch.ones(n_embd), p + "ln_1.bias": torch.zeros(n_embd),
            p + "ln_2.weight": torch.ones(n_embd), p + "ln_2.bias": torch.zeros(n_embd),
            p + "attn.c_attn.weight": torch.randn(n_embd, 3 * n_embd) * 0.02, p + "attn.c_attn.bias": torch.zeros(3 * n_embd),
            p + "attn.c_proj.weight": torch.randn(n_embd, n_embd) * 0.02, p + "attn.c_proj.bias": torch.zeros(n_embd),
            p + "mlp.c_fc.weight": torch.randn(n_embd, 4 * n_embd) * 0.02, p + "mlp.c_fc.bias": torch.zeros(4 * n_embd),
            p + "mlp.c_proj.weight": torch.randn(4 * n_embd, n_embd) * 0.02, p + "mlp.c_proj.bias": torch.zeros(n_embd),
        })
    # torch.compile leaves an `_orig_mod.` prefix on saved keys; the loader must strip it.
    save_file({"_orig_mod." + k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return tensors


def test_loads_published_checkpoint_format(tmp_path):
    tensors = write_published_checkpoint(tmp_path / "published")
    loaded = load_model(tmp_path / "published", dtype=torch.float32)
    assert loaded.info.extra["published_format"]
    assert not loaded.info.supports_missing_properties
    state = loaded.model.state_dict()
    assert torch.equal(state["conditioning.to_kv.weight"], tensors["conditioning.to_kv.weight"])
    assert torch.equal(state["lm_head.weight"], tensors["transformer.wte.weight"])  # tied


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "cannot read weights"),
        (lambda d: (d / "model.safetensors").unlink(), "no .safetensors"),
        (lambda d: edit_config(d, n_embd=30, n_head=4), "cannot build a model"),
        (lambda d: edit_config(d, vocab_size=500), "declares 500 tokens"),
        (lambda d: edit_config(d, n_layer="eight"), "invalid settings"),
    ],
)
def test_corrupt_checkpoints_give_clear_errors(tmp_path, damage, message):
    directory = tmp_path / "ckpt"
    write_published_checkpoint(directory)
    damage(directory)
    with pytest.raises(ValueError, match=message):
        load_model(directory)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope")
