"""Every user-facing input fails with a message a person can act on (issue 9): uploaded files,
composition and element-set fields, model directories that are corrupt, partial, huge or of
another architecture."""
from __future__ import annotations

import io
import json
import shutil
import zipfile

import pytest
import torch
from conftest import tiny_config
from test_model import edit_config, write_published_checkpoint

from crystallm_core.chem.cif.prompts import (
    build_prompt,
    element_token_ids,
    parse_composition,
)
from crystallm_core.lm.checkpoints import MAX_PARAMETERS, load_model, save_model
from crystallm_core.lm.model import CrystaLLMPKV
from crystallm_core.lm.tokenizer import get_tokenizer
from crystallm_core.product.run_files import MAX_CIF_BYTES, uploaded_cif_text


def zip_of(name: str, text: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, text)
    return buffer.getvalue()


@pytest.mark.parametrize("data, message", [
    (zip_of("x.cif", "data_x\n"), "this is a zip archive, not a CIF. Unpack it and upload one .cif from it."),
    (b"\x1f\x8b\x08\x00" + bytes(40), "this is a gzip file, not a CIF. Unpack it and upload one .cif from it."),
    (b"%PDF-1.7\n...", "this is a PDF, not a CIF."),
    (b"data_x\n\x00\x01\x02", "this is a binary file, not a CIF (a CIF is plain text)"),
    (b"   \n\t", "the file is empty"),
    (b"a,b,c\n1,2,3\n", "this is not a CIF: it has no data_ block"),
    (b"data_x\n" + b"#" * MAX_CIF_BYTES, "the file is 1.0 MB; CIFs over 1 MB are not read (the model writes ~2 kB)"),
])
def test_uploads_that_are_not_cifs_say_what_they_are(data, message):
    with pytest.raises(ValueError) as raised:
        uploaded_cif_text(data)
    assert str(raised.value) == message


def test_uploads_in_other_encodings_are_read():
    assert uploaded_cif_text("\ufeffdata_NaCl\n# Å".encode()) == "data_NaCl\n# Å"  # UTF-8 with a BOM
    assert uploaded_cif_text("data_NaCl\n# Å".encode("latin-1")) == "data_NaCl\n# Å"  # not UTF-8: Latin-1


@pytest.mark.parametrize("formula, message", [
    ("Ti0O2", "Ti0 in 'Ti0O2': every element needs at least one atom"),
    ("NaCl" + "2" * 400, "'Cl2222222222…' in 'NaCl222222222222222222222222222222222222…': far more atoms than"),
    ("Na\x00Cl", "'Na\\x00Cl' is not a chemical formula"),
    ("TiO₂", "'TiO₂' is not a chemical formula"),
])
def test_composition_messages_are_short_and_printable(formula, message):
    with pytest.raises(ValueError) as raised:
        parse_composition(formula)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize("composition, message", [
    ("Na" * 5000, "Na5000 has 5000 atoms in the cell; the model writes at most 20"),
    ("H1000000", "'H1000000' in 'H1000000': far more atoms than a cell holds"),
    ("Og2", "the model cannot write these elements: Og"),
])
def test_prompts_the_model_cannot_write_are_explained(composition, message):
    with pytest.raises(ValueError, match=message):
        build_prompt(get_tokenizer(), composition)


def test_element_set_messages_list_a_few_entries():
    with pytest.raises(ValueError) as raised:
        element_token_ids(get_tokenizer(), [f"Q{i}" for i in range(500)] + ["Na\x00"])
    assert str(raised.value) == "not chemical elements: Q0, Q1, Q2, Q3, Q4, Q5, Q6, Q7 and 493 more"
    assert len(element_token_ids(get_tokenizer(), ["Na"] * 1000 + ["Cl"])) > 80  # duplicates are harmless


@pytest.fixture
def checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    write_published_checkpoint(directory)
    return directory


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").write_text("[1, 2]"), r"is not a model config \(a JSON list, not an object\)"),
    (lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00"), "is not valid JSON"),
    (lambda d: edit_config(d, n_layer=2000, n_embd=8192, n_head=64),
     "asks for ~1612.7 billion parameters; at most 1 billion are loaded"),
    (lambda d: edit_config(d, n_positions=10**12), "billion parameters; at most 1 billion are loaded"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     "cannot read weights file model.safetensors"),  # a download cut short
    (lambda d: (d / "metadata.json").write_text("{oops"), "metadata.json is not valid JSON"),
    (lambda d: edit_config(d, n_embd=64), "have the wrong shapes"),  # same layout, another width
])
def test_bad_model_directories_fail_with_a_reason(checkpoint, damage, message):
    damage(checkpoint)
    with pytest.raises(ValueError, match=message):
        load_model(checkpoint)


def test_another_architecture_is_named_as_such(tmp_path):
    """A plain GPT-2 (or any Hugging Face model) directory: not a PKV config."""
    directory = tmp_path / "gpt2"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768, "n_layer": 12}))
    with pytest.raises(ValueError, match="is not a PKV \\(prefix-attention\\) model config"):
        load_model(directory)


def test_weights_bigger_than_the_limit_are_not_read(checkpoint, monkeypatch):
    import crystallm_core.lm.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "MAX_WEIGHTS_BYTES", 1000)
    with pytest.raises(ValueError, match=r"the weights in .* take 0\.0 GiB; at most 0\.0 GiB are loaded"):
        load_model(checkpoint)
    assert MAX_PARAMETERS == 1_000_000_000


def test_a_missing_shard_is_reported_as_missing_weights(tmp_path):
    torch.manual_seed(0)
    save_model(CrystaLLMPKV(tiny_config(n_embd=256, n_head=4, n_layer=4, n_hidden_cond=512)), tmp_path / "m")
    shards = sorted((tmp_path / "m").glob("*.safetensors"))
    assert len(shards) > 1
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "m", partial)
    (partial / shards[-1].name).unlink()
    with pytest.raises(ValueError, match="do not fit the config: [1-9][0-9]* missing"):
        load_model(partial)
