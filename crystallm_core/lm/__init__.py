"""The language model: tokenizer, PKV model, KV cache, sampler, training, checkpoints (torch; no pymatgen)."""
