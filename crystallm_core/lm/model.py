"""The PKV ("prefix attention") model: a GPT-2 that writes CIFs, steered by target properties.

A small MLP, the property encoder (`conditioning`), maps the normalised condition vector
(band gap, E_hull) to `n_prefix_tokens` key/value pairs per attention layer. These "ghost
tokens" have no embedding, position or LayerNorm: every CIF token can attend to them, which
is how the targets reach every layer. CIF tokens use positions n_prefix…n_positions-1, as in
the published CrystaLLM-pi bandgap checkpoint (reference §1), so that checkpoint loads as is.

Improvements over the original:
- a learned "unknown" embedding per property (the encoder's first layer sees it instead of a
  value), so a property may be omitted, and conditioning dropout at training time, which
  also gives the unconditional model that classifier-free guidance needs;
- the prefix is concatenated inside our own attention step (`prefix_attention_forward`)
  rather than smuggled in as a library cache object, so a transformers upgrade cannot
  silently skip it; `tests/test_model.py` checks it against the library's own cache path.

Sampling goes through one forward over an explicit `kv_cache.StaticKVCache` (`forward_cached`,
after gpt-fast): the cache owns the prefix, per-row lengths and rewinds, and the
same call does prefill (many tokens), jump-forward spans (a few tokens per row, ragged) and
decode steps (one token per row). On a CPU in bf16 that forward reads the cache through a native
kernel (`native_attention`) and the weights in oneDNN's packed layout (`packed_linear`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN

from crystallm_core.lm.kv_cache import StaticKVCache, query_groups
from crystallm_core.lm.native_attention import native_attention
from crystallm_core.lm.packed_batch import PackedBatch
from crystallm_core.lm.int8_linear import Int8Linears, int8_linears
from crystallm_core.lm.packed_linear import PackedLinears, packed_linears


class PKVConfig(GPT2Config):
    """GPT-2 config plus the property encoder's fields (names as in the published config)."""

    model_type = "crystallm_pkv"

    def __init__(
        self,
        n_input_vector: int = 2,
        n_prefix_tokens: int = 2,
        n_hidden_cond: int = 1024,
        cond_dropout: float = 0.1,
        share_layers: bool = False,
        missing_property_embedding: bool = True,
        **kwargs,
    ):
        self.n_input_vector = n_input_vector
        self.n_prefix_tokens = n_prefix_tokens
        self.n_hidden_cond = n_hidden_cond
        self.cond_dropout = cond_dropout
        self.share_layers = share_layers
        # False for published CrystaLLM-pi checkpoints: they require every property.
        self.missing_property_embedding = missing_property_embedding
        kwargs.setdefault("vocab_size", 377)
        kwargs.setdefault("bos_token_id", 372)
        kwargs.setdefault("eos_token_id", 373)
        kwargs.setdefault("pad_token_id", 371)
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def max_cif_tokens(self) -> int:
        """CIF tokens (incl. <bos>/<eos>) that fit after the prefix positions."""
        return self.n_positions - self.n_prefix_tokens


class PropertyEncoder(nn.Module):
    """Condition vector → per-layer prefix keys and values (module names match the published keys)."""

    def __init__(self, config: PKVConfig):
        super().__init__()
        hidden = config.n_hidden_cond
        self.config = config
        self.processor = nn.Sequential(
            nn.Linear(config.n_input_vector, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2 * hidden),
        )
        layers = 1 if config.share_layers else config.n_layer
        self.to_kv = nn.Linear(2 * hidden, layers * config.n_prefix_tokens * 2 * config.n_embd)
        self.dropout = nn.Dropout(config.cond_dropout)
        if config.missing_property_embedding:
            self.unknown_embedding = nn.Parameter(torch.zeros(config.n_input_vector, hidden))

    def forward(self, conditions: torch.Tensor, present: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return one (key, value) pair per layer, each (B, n_head, n_prefix, head_dim)."""
        cfg = self.config
        first, rest = self.processor[0], self.processor[1:]
        if present is None or bool(present.all()):
            hidden = first(conditions)
        else:
            if not cfg.missing_property_embedding:
                raise ValueError("this checkpoint needs every property: it was trained without 'unknown' embeddings")
            present_f = present.to(conditions.dtype)
            # A missing property contributes its learned embedding instead of weight × value.
            hidden = first(conditions * present_f) + (1.0 - present_f) @ self.unknown_embedding
        kv = self.dropout(self.to_kv(rest(hidden)))
        batch = conditions.shape[0]
        kv = kv.view(batch, -1, cfg.n_prefix_tokens, 2, cfg.n_head, cfg.head_dim)
        kv = kv.expand(batch, cfg.n_layer, *kv.shape[2:])
        # (B, L, P, 2, H, D) → per layer (B, H, P, D); flat layout l·2PE + p·2E + kv·E + h·D + d.
        return [(kv[:, i, :, 0].transpose(1, 2), kv[:, i, :, 1].transpose(1, 2)) for i in range(cfg.n_layer)]


def split_heads(block: nn.Module, hidden: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm + QKV projection of one GPT-2 block, as (B, H, T, D) tensors."""
    q, k, v = block.attn.c_attn(block.ln_1(hidden)).split(hidden.shape[-1], dim=2)
    shape = (hidden.shape[0], hidden.shape[1], n_head, -1)
    return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)


def finish_block(block: nn.Module, hidden: torch.Tensor, q, k, v, mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention over (k, v), output projection, residuals and MLP of one GPT-2 block."""
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    attn = attn.transpose(1, 2).reshape(hidden.shape)
    hidden = hidden + block.attn.resid_dropout(block.attn.c_proj(attn))
    return hidden + block.mlp(block.ln_2(hidden))


class CrystaLLMPKV(GPT2LMHeadModel):
    """GPT-2 LM head model + property encoder; state-dict keys match CrystaLLM-pi's PKVGPT."""

    config_class = PKVConfig

    def __init__(self, config: PKVConfig):
        super().__init__(config)
        if config.activation_function == "gelu_new":
            # The same tanh approximation as one fused kernel instead of six elementwise ops
            # (equal within 3e-7; the MLP's activation was 8 % of a CPU decode step).
            for block in self.transformer.h:
                block.mlp.act = ACT2FN["gelu_pytorch_tanh"]
        self.conditioning = PropertyEncoder(config)
        self.conditioning.apply(self._init_weights)
        if config.missing_property_embedding:
            nn.init.normal_(self.conditioning.unknown_embedding, std=0.02)

    def prefix_attention_forward(
        self,
        input_ids: torch.Tensor,
        conditions: torch.Tensor,
        condition_present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for full sequences starting at position 0 of the CIF (training/scoring).

        Sequences are right-padded; padding never influences real tokens because attention is
        causal, and each row has its own condition vector (no packing across structures).
        """
        cfg = self.config
        prefix = self.conditioning(conditions, condition_present)
        T, P = input_ids.shape[1], cfg.n_prefix_tokens
        if T > cfg.max_cif_tokens:
            raise ValueError(f"sequence of {T} tokens exceeds the model's context of {cfg.max_cif_tokens}")
        positions = torch.arange(P, P + T, device=input_ids.device)
        hidden = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(positions))
        # Query t sees every prefix slot and CIF tokens 0…t.
        mask = torch.ones(T, P + T, dtype=torch.bool, device=input_ids.device).tril(diagonal=P)
        dropout_p = cfg.attn_pdrop if self.training else 0.0
        for block, (prefix_k, prefix_v) in zip(self.transformer.h, prefix):
            q, k, v = split_heads(block, hidden, cfg.n_head)
            k = torch.cat([prefix_k.to(k.dtype), k], dim=2)
            v = torch.cat([prefix_v.to(v.dtype), v], dim=2)
            hidden = finish_block(block, hidden, q, k, v, mask, dropout_p)
        return self.lm_head(self.transformer.ln_f(hidden))

    def setup_cache(self, rows: int, capacity: int | None = None) -> StaticKVCache:
        """An empty cache for `rows` sequences of up to `capacity` CIF tokens (default: the context)."""
        cfg = self.config
        capacity = min(capacity or cfg.max_cif_tokens, cfg.max_cif_tokens)
        param = next(self.parameters())
        # The cache is stored in the weights' dtype (bf16 halves what every step reads); attention
        # over it computes in fp32 (cache_attention).
        return StaticKVCache(cfg.n_layer, rows, cfg.n_head, cfg.n_prefix_tokens + capacity, cfg.head_dim,
                             param.dtype, param.device)

    def forward_cached(self, tokens: torch.Tensor, counts: torch.Tensor, cache: StaticKVCache,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """Feed `counts[b]` new tokens to cache row `rows[b]` (rows None = rows 0…B-1, in order) and
        return the next-token logits (B, V) after each row's last new token.

        `tokens` (N,) holds the rows' tokens back to back (N = counts.sum(), every count ≥ 1),
        so one call serves a decode step (one token per row), a prefill, and ragged
        jump-forward spans, and the linear layers see no padding. Attention is the native
        kernel's on CPUs (`native_attention`), else batched by `kv_cache.query_groups`.
        """
        cfg, tf = self.config, self.transformer
        device = tokens.device
        batch = counts.shape[0]
        cache_rows = torch.arange(batch, device=device) if rows is None else rows
        lengths = cache.lengths[cache_rows]
        if tokens.shape[0] == batch:  # a decode step: one token per row (every count is ≥ 1)
            starts = row_of = torch.arange(batch, device=device)
            positions = lengths
        else:
            starts = torch.cumsum(counts, 0) - counts
            row_of = torch.repeat_interleave(torch.arange(batch, device=device), counts)
            positions = lengths[row_of] + torch.arange(tokens.shape[0], device=device) - starts[row_of]
        hidden = tf.wte(tokens) + tf.wpe(positions.clamp(max=cfg.n_positions - 1))
        write_rows = cache_rows[row_of]
        # Each token is written to its row and sees it up to its own position: the native kernel
        # does exactly that; the fallback scatters the keys and batches tokens into padded groups.
        native = native_attention.supports(hidden, cache.keys[0])
        groups = None if native else query_groups(starts, counts, lengths, rows, cache_rows)
        packed = packed_linears(self, hidden) or int8_linears(self, hidden)
        linear = packed or (lambda module, x: module(x))
        for layer, block in enumerate(tf.h):
            qkv = linear(block.attn.c_attn, block.ln_1(hidden))
            if native:
                attended = native_attention(qkv, cache.keys[layer], cache.values[layer], write_rows, positions)
            else:
                q, k, v = (part.view(-1, cfg.n_head, cfg.head_dim) for part in qkv.split(cfg.n_embd, dim=1))
                cache.write(layer, write_rows, positions, k, v)
                attended = torch.empty_like(q)
                for queries in groups:
                    queries.attend(cache, layer, q, attended)
            hidden = hidden + linear(block.attn.c_proj, attended.reshape(-1, cfg.n_embd))
            hidden = hidden + self.mlp(block, block.ln_2(hidden), packed)
        cache.lengths[cache_rows] += counts
        last = tf.ln_f(hidden[starts + counts - 1])
        return (packed(self.lm_head, last) if packed else self.lm_head(last)).float()

    def mlp(self, block: nn.Module, x: torch.Tensor, packed: PackedLinears | Int8Linears | None) -> torch.Tensor:
        """A block's MLP (inference): through packed (bf16) or int8 weights, the tanh-GELU fused, where they serve."""
        if packed is None:
            return block.mlp(x)
        if self.config.activation_function == "gelu_new":  # computed as gelu_pytorch_tanh (__init__)
            return packed(block.mlp.c_proj, packed(block.mlp.c_fc, x, gelu_tanh=True))
        return packed(block.mlp.c_proj, block.mlp.act(packed(block.mlp.c_fc, x)))

    def sequence_loss(
        self,
        input_ids: torch.Tensor,
        conditions: torch.Tensor,
        condition_present: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token NLL per row and the number of predicted tokens per row."""
        logits = self.prefix_attention_forward(input_ids, conditions, condition_present)
        targets = input_ids[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
        if lengths is None:
            counted = torch.ones_like(nll)
        else:
            counted = (torch.arange(targets.shape[1], device=nll.device)[None, :] < (lengths[:, None] - 1)).to(nll.dtype)
        return (nll * counted).sum(dim=1), counted.sum(dim=1)

    def packed_sequence_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """`sequence_loss` without compute on padding (training's fast step): the same
        (summed NLL, predicted tokens) per sequence, for sequences stored back to back.

        Embeddings, every linear layer, the MLPs and the LM head see only real tokens (N, C).
        Attention alone needs rows: the tokens are scattered into (B, T) and one zero query
        per prefix slot is put in front, so query P + t sees prefix keys 0…P-1 and CIF keys
        0…t under a plain `is_causal` mask, which is what the fused SDPA kernels take (flash
        on a GPU, the fused CPU kernel here). Right padding sits after every real key, so it
        needs no mask; its outputs are never gathered back.
        """
        cfg = self.config
        P, H, D, C = cfg.n_prefix_tokens, cfg.n_head, cfg.head_dim, cfg.n_embd
        rows, T = batch.rows, batch.max_length
        if T > cfg.max_cif_tokens:
            raise ValueError(f"sequence of {T} tokens exceeds the model's context of {cfg.max_cif_tokens}")
        prefix = self.conditioning(batch.conditions, batch.present)
        tf = self.transformer
        hidden = tf.drop(tf.wte(batch.tokens) + tf.wpe(batch.positions + P))
        dropout_p = cfg.attn_pdrop if self.training else 0.0
        for block, (prefix_k, prefix_v) in zip(tf.h, prefix):
            qkv = block.attn.c_attn(block.ln_1(hidden))
            padded = qkv.new_zeros(rows * T, 3 * C).index_copy(0, batch.padded_index, qkv)
            q, k, v = (part.view(rows, T, H, D).transpose(1, 2) for part in padded.split(C, dim=1))
            q = torch.cat([q.new_zeros(rows, H, P, D), q], dim=2)
            k = torch.cat([prefix_k.to(k.dtype), k], dim=2)
            v = torch.cat([prefix_v.to(v.dtype), v], dim=2)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
            attn = attn[:, :, P:].transpose(1, 2).reshape(rows * T, C).index_select(0, batch.padded_index)
            hidden = hidden + block.attn.resid_dropout(block.attn.c_proj(attn))
            hidden = hidden + block.mlp(block.ln_2(hidden))
        logits = self.lm_head(tf.ln_f(hidden))
        nll = F.cross_entropy(logits.float(), batch.targets, reduction="none", ignore_index=-100)
        counted = (batch.targets >= 0).to(nll.dtype)
        per_row = torch.zeros(rows, dtype=nll.dtype, device=nll.device)
        return per_row.index_add(0, batch.row_of, nll), per_row.index_add(0, batch.row_of, counted)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the tied lm_head is counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
