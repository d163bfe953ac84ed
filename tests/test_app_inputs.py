"""Hostile input through the pages (AppTest, no browser): an inline message, never a traceback,
and nothing lost (issue 9)."""
from __future__ import annotations

import json
import time

import pytest
from fuzz_corpus import pathological_cifs
from test_app_pages import messages, new_app
from test_untrusted_inputs import zip_of


@pytest.mark.parametrize("name, data, message", [
    ("run.cif", zip_of("cifs/000_NaCl.cif", "data_NaCl\n"), "this is a zip archive, not a CIF"),
    ("photo.cif", b"\x89PNG\r\n\x1a\n" + bytes(100), "this is a PNG image, not a CIF"),
    ("big.cif", b"data_x\n" + b"_cell_length_a 5\n" * 70_000, "CIFs over 1 MB are not read"),
    ("notes.cif", "Ünïcödé notes, no CIF here".encode(), "it has no data_ block"),
    ("symmetric.cif", pathological_cifs()["500 rows in Fm-3m (96,000 images to merge)"].encode(),
     "at most 8000 are parsed"),
])
def test_explore_rejects_what_is_not_a_readable_cif_with_its_reason(app_env, name, data, message):
    at = new_app("pages/explore.py")
    at.file_uploader(key="explore_upload").upload(name, data, "chemical/x-cif")
    started = time.perf_counter()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert f"{name}: " in messages(at.error) and message in messages(at.error)
    assert time.perf_counter() - started < 20  # the 500-row upload used to hold the server for minutes


def test_explore_describes_an_upload_with_an_unknown_symbol(app_env):
    cif = pathological_cifs()["near-singular lattice (angles 119.999°)"].replace("Cu", "Qq")
    at = new_app("pages/explore.py")
    at.file_uploader(key="explore_upload").upload("odd.cif", cif.encode(), "chemical/x-cif")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    values = " ".join(at.table[0].value["value"].tolist())
    assert "not detected (the cell is nearly flat" in values and "no mass for the placeholder species" in values


@pytest.mark.parametrize("files, message", [
    ({"config.json": "[]"}, "is not a model config"),
    ({"config.json": json.dumps({"model_type": "llama", "hidden_size": 4096})}, "is not a PKV (prefix-attention)"),
    ({"config.json": json.dumps({"n_prefix_tokens": 2, "n_input_vector": 2, "n_layer": 4000, "n_embd": 16384,
                                 "n_head": 64})}, "billion parameters; at most 1 billion are loaded"),
    ({"config.json": json.dumps({"n_prefix_tokens": 2, "n_input_vector": 2, "n_layer": 2, "n_embd": 32,
                                 "n_head": 2}), "model.safetensors": "not weights"}, "cannot read weights file"),
])
def test_home_explains_a_model_directory_it_cannot_load(app_env, files, message):
    directory = app_env / "model_dir"
    directory.mkdir()
    for name, content in files.items():
        (directory / name).write_text(content)
    at = new_app()
    at.radio(key="model_kind").set_value("Local directory")
    at.text_input(key="model_location").set_value(str(directory))
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "could not be loaded" in messages(at.error) and message in messages(at.error)
    assert "model_source" not in at.session_state and "tiny-test-model" in messages(at.markdown)


@pytest.mark.parametrize("composition, elements, message", [
    ("Ti0O2", "", "every element needs at least one atom"),
    ("Na" * 3000, "", "Na3000 has 3000 atoms in the cell"),
    ("Og2", "", "the model cannot write these elements: Og"),
    ("", ", ".join(f"Zz{i}" for i in range(300)), "and 292 more"),
    ("", "🧪 \u202e", "not chemical elements: '🧪', '\\u202e'"),
])
def test_generate_fields_refuse_hostile_values_inline(app_env, composition, elements, message):
    at = new_app("pages/generate.py")
    at.text_input(key="composition").set_value(composition)
    at.text_input(key="elements").set_value(elements)
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert message in messages(at.error) and "job" not in at.session_state
