"""Saving and loading PKV models: our own format and the published CrystaLLM-pi one.

Both are Hugging Face style directories (`config.json` + `*.safetensors`). Weights are only
ever read through safetensors, never pickle. A published CrystaLLM-pi_bandgap directory has a
GPT-2 style config (its `model_type` is probably "gpt2") with the PKV fields added and the
state-dict keys of reference §7; we recognise it by those fields, not by the model type.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from crystallm_core.lm.model import CrystaLLMPKV, PKVConfig, count_parameters
from crystallm_core.paths import DEFAULT_MODEL_DIR

MAX_SHARD_BYTES = 15 * 2**20 - 2**16  # 15 MiB files, leaving room for the safetensors header
PART_MARK = "::part"  # suffix of row-chunks of a tensor larger than one shard
VOCAB_SIZE = 377  # the CrystaLLM-pi CIF vocabulary (tokenizer.build_vocabulary)
HUB_ID_PATTERN = re.compile(r"^[\w.-]+/[\w.-]+$")
# A model directory is untrusted input: a config can ask for any size, and building it would
# take the server's memory before any check. CrystaLLM-pi models have 25–200 M parameters.
MAX_PARAMETERS = 1_000_000_000
MAX_WEIGHTS_BYTES = 4 * MAX_PARAMETERS + 2**20  # fp32, plus headers


@dataclass
class ModelInfo:
    """What the UI, CLI and manifests say about a loaded model."""

    name: str
    source: str
    n_params: int
    weights_sha256: str
    trained_on: str
    supports_missing_properties: bool
    dtype: str
    n_layer: int
    n_embd: int
    extra: dict = field(default_factory=dict)


@dataclass
class LoadedModel:
    model: CrystaLLMPKV
    tokenizer: "CIFTokenizer"  # noqa: F821 (imported lazily: training runs without spglib)
    info: ModelInfo


def inference_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bf16 where the hardware has fast bf16 (CUDA, or CPUs with AVX512-BF16/AMX), else fp32."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def shard_tensors(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy shards of at most max_bytes; a tensor larger than that is split by rows into parts."""
    pieces: list[tuple[str, torch.Tensor]] = []
    for key, tensor in state.items():
        tensor = tensor.detach().contiguous()
        size = tensor.numel() * tensor.element_size()
        if size <= max_bytes or tensor.dim() == 0:
            pieces.append((key, tensor))
            continue
        rows = max(1, max_bytes // (tensor[0].numel() * tensor.element_size()))
        for part, start in enumerate(range(0, tensor.shape[0], rows)):
            pieces.append((f"{key}{PART_MARK}{part}", tensor[start : start + rows].clone()))
    shards, current, current_size = [], {}, 0
    for key, tensor in pieces:
        size = tensor.numel() * tensor.element_size()
        if current and current_size + size > max_bytes:
            shards.append(current)
            current, current_size = {}, 0
        current[key], current_size = tensor, current_size + size
    return shards + ([current] if current else [])


def save_model(model: CrystaLLMPKV, out_dir: str | Path, metadata: dict | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write config.json + safetensors shards (≤ 15 MiB each) + optional metadata.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.safetensors"):
        old.unlink()
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in model.state_dict().items() if k != "lm_head.weight"}  # lm_head is tied to wte
    shards = shard_tensors(state, MAX_SHARD_BYTES)
    for i, shard in enumerate(shards, start=1):
        save_file(shard, str(out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(out_dir / "config.json")
    if metadata is not None:
        (out_dir / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return out_dir


def weights_sha256(model_dir: Path) -> str:
    """One hash over all safetensors files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_config(model_dir: Path) -> tuple[PKVConfig, bool]:
    """Config from config.json; returns (config, is_published_format)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{model_dir} has no config.json: not a model directory")
    raw = read_json_object(config_path, "a model config")
    if "n_prefix_tokens" not in raw or "n_input_vector" not in raw:
        raise ValueError(f"{config_path} is not a PKV (prefix-attention) model config: no n_prefix_tokens/n_input_vector")
    published = raw.get("model_type") != PKVConfig.model_type
    if published:
        raw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "transformers_version")}
        raw["missing_property_embedding"] = False
        raw["cond_dropout"] = raw.pop("dropout", 0.1)
    try:
        config = PKVConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    except Exception as error:  # transformers validates fields with its own error types
        raise ValueError(f"{config_path} has invalid settings: {str(error).splitlines()[0]}") from None
    if config.vocab_size != VOCAB_SIZE:
        raise ValueError(f"{config_path} declares {config.vocab_size} tokens; the CIF tokenizer has {VOCAB_SIZE}")
    return config, published


def parameter_estimate(config: PKVConfig) -> int:
    """Parameters the config asks for (embeddings, blocks, property encoder), before building it."""
    embd, layers = int(config.n_embd), int(config.n_layer)
    encoder = 2 * int(config.n_hidden_cond) * layers * 2 * int(config.n_prefix_tokens) * embd
    return embd * (int(config.vocab_size) + int(config.n_positions)) + layers * 12 * embd * embd + encoder


def check_size(config: PKVConfig, model_dir: Path) -> None:
    """ValueError when the config or the weight files are too big to load on this server."""
    try:
        wanted = parameter_estimate(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{model_dir / 'config.json'} has invalid sizes ({error})") from None
    if wanted > MAX_PARAMETERS:
        raise ValueError(f"{model_dir / 'config.json'} asks for ~{wanted / 1e9:.1f} billion parameters; "
                         f"at most {MAX_PARAMETERS / 1e9:g} billion are loaded")
    size = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))
    if size > MAX_WEIGHTS_BYTES:
        raise ValueError(f"the weights in {model_dir} take {size / 2**30:.1f} GiB; "
                         f"at most {MAX_WEIGHTS_BYTES / 2**30:.1f} GiB are loaded")


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors from the directory's safetensors files, with torch.compile prefixes stripped."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no .safetensors weights (pickle checkpoints are not loaded, for safety)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read weights file {path.name}: {error}") from None
        state.update({key.replace("_orig_mod.", ""): value for key, value in tensors.items()})
    parts = sorted((k for k in state if PART_MARK in k), key=lambda k: (k.split(PART_MARK)[0], int(k.split(PART_MARK)[1])))
    for key in dict.fromkeys(k.split(PART_MARK)[0] for k in parts):
        state[key] = torch.cat([state.pop(k) for k in parts if k.split(PART_MARK)[0] == key])
    return state


def resolve_model_dir(source: str | Path | None) -> Path:
    """None → $CRYSTALLM_MODEL_DIR or the shipped default; a hub id is fetched only when online."""
    if source is None or str(source) == "":
        source = os.environ.get("CRYSTALLM_MODEL_DIR") or DEFAULT_MODEL_DIR
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if HUB_ID_PATTERN.match(str(source)) and not str(source).startswith((".", "/")):
        return download_from_hub(str(source))
    raise ValueError(f"model directory {path} does not exist")


def download_from_hub(hub_id: str) -> Path:
    """Fetch config + safetensors of a hub model (needs internet; never used by default)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as error:
        raise ValueError(f"could not download '{hub_id}' from the Hugging Face hub ({type(error).__name__}: {error})") from None


def load_model_weights(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> CrystaLLMPKV:
    """The model alone (eval mode), from a local directory; needs only torch + safetensors."""
    model_dir = Path(model_dir)
    config, _ = read_config(model_dir)
    check_size(config, model_dir)
    state = read_state_dict(model_dir)
    try:
        model = CrystaLLMPKV(config)
    except (AssertionError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"cannot build a model from {model_dir / 'config.json'}: {error}") from None
    expected = set(model.state_dict())
    missing = sorted(expected - set(state) - {"lm_head.weight"})
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights in {model_dir} do not fit the config: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise ValueError(f"weights in {model_dir} have the wrong shapes: {str(error).splitlines()[1:3]}") from None
    model.tie_weights()
    return model.to(device=device, dtype=dtype or inference_dtype(device)).eval()


def read_metadata(path: Path) -> dict:
    """metadata.json (optional: {} when absent); ValueError when it is not a JSON object."""
    if not path.is_file():
        return {}
    return read_json_object(path, "metadata")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from `path`; ValueError (with the path) when it is not JSON or not an object."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not {what} (a JSON {type(value).__name__}, not an object)")
    return value


def load_model(source: str | Path | None = None, device: str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Model + tokenizer + description, for inference. Raises ValueError with a clear reason."""
    from crystallm_core.lm.tokenizer import (
        get_tokenizer,  # imported here: training runs where spglib is absent
    )

    model_dir = resolve_model_dir(source)
    _, published = read_config(model_dir)
    model = load_model_weights(model_dir, device, dtype)
    metadata = read_metadata(model_dir / "metadata.json")
    info = ModelInfo(
        name=metadata.get("name", model_dir.name),
        source=str(model_dir),
        n_params=count_parameters(model),
        weights_sha256=weights_sha256(model_dir),
        trained_on=metadata.get("trained_on", "CrystaLLM-pi published checkpoint" if published else "unknown"),
        supports_missing_properties=model.config.missing_property_embedding,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        n_layer=model.config.n_layer,
        n_embd=model.config.n_embd,
        extra={"published_format": published, **metadata},
    )
    return LoadedModel(model=model, tokenizer=get_tokenizer(), info=info)
