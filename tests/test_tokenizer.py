"""Tokenizer: exact CrystaLLM-pi vocabulary, round trips, loud failures on unknown text."""
from __future__ import annotations

import json
import re

import pytest
from prototypes import all_prototypes

from crystallm_core.chem.cif.cif_format import structure_to_model_cif, training_text
from crystallm_core.lm.tokenizer import (
    UnknownTokenError,
    build_vocabulary,
    get_tokenizer,
)
from crystallm_core.paths import data_dir

PUBLISHED_VOCAB = data_dir() / "crystallm_pi_tokenizer" / "vocabulary.json"
MP20_SAMPLE = data_dir() / "mp20" / "mp_20_pilot__train.csv.gz"


def normalised(text: str) -> str:
    return re.sub(r"[ \t]+", " ", text)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def test_vocabulary_layout():
    vocab = build_vocabulary()
    assert len(vocab) == 377 and len(set(vocab)) == 377
    assert vocab[:3] == ["Si", "C", "Pb"] and vocab[88] == "Ar"
    assert vocab[89:99] == list("0123456789")
    assert vocab[141:143] == [" ", "\n"]
    assert vocab[143] == "P6/mmm_sg" and vocab[369] == "Cmme_sg"
    assert vocab[370:] == ["<unk>", "<pad>", "<bos>", "<eos>", "[", "]", "<prop>"]
    # odd but real spglib spellings the published model knows
    for token in ("Aea2_sg", "Cmce_sg", "P2_1/c_sg", "P42_12_sg", "P4_22_12_sg", "Pmna_sg"):
        assert token in vocab
    for missing in ("P6_sg", "P432_sg", "P4_222_sg"):  # never had a token in CrystaLLM
        assert missing not in vocab


@pytest.mark.skipif(not PUBLISHED_VOCAB.exists(), reason=f"{PUBLISHED_VOCAB} not available")
def test_vocabulary_matches_published_file_token_for_token():
    published = json.loads(PUBLISHED_VOCAB.read_text())
    assert build_vocabulary() == sorted(published, key=published.get)


def test_special_ids(tokenizer):
    assert (tokenizer.unk_id, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (370, 371, 372, 373)
    assert tokenizer.token_to_id["["] == 374 and tokenizer.token_to_id["<prop>"] == 376
    assert tokenizer.encode("<bos>\n<eos><pad>") == [372, 142, 373, 371]


def test_numbers_digit_by_digit_and_longest_match(tokenizer):
    assert tokenizer.tokenize("_cell_length_a [4.5940]") == [
        "_cell_length_a", " ", "[", "4", ".", "5", "9", "4", "0", "]"]
    assert tokenizer.tokenize("Sn Si S") == ["Sn", " ", "Si", " ", "S"]


def test_whitespace_collapses(tokenizer):
    assert tokenizer.tokenize("  Ti \t Ti0") == [" ", "Ti", " ", "Ti", "0"]


@pytest.mark.parametrize("text", ["_symmetry_space_group_name_H-M [P4_2/mnm]",
                                  "_symmetry_space_group_name_H-M P4_2/mnm",
                                  "_symmetry_space_group_name_H-M   P4_2/mnm\n"])
def test_space_group_becomes_one_token(tokenizer, text):
    tokens = tokenizer.tokenize(text)
    assert "P4_2/mnm_sg" in tokens
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == normalised(text)


def test_decode_skipping_specials(tokenizer):
    ids = tokenizer.encode("<bos>\ndata_[Ti2O4]\n_symmetry_space_group_name_H-M [Pm-3m]\n<eos><pad>")
    assert tokenizer.decode(ids) == "\ndata_Ti2O4\n_symmetry_space_group_name_H-M Pm-3m\n"
    assert tokenizer.decode(ids, skip_special_tokens=False).startswith("<bos>\ndata_[Ti2O4]")


def test_unknown_characters_are_reported_not_dropped(tokenizer):
    with pytest.raises(UnknownTokenError) as info:
        tokenizer.encode("data_[Ti2O4] # comment\n_cell_length_a [4;5]")
    assert info.value.fragments == ["#", "comment", ";"]
    ids, unknown = tokenizer.encode_with_report("Ti;O")
    assert ids == [tokenizer.token_to_id["Ti"], tokenizer.unk_id, tokenizer.token_to_id["O"]]
    assert unknown == [";"]
    with pytest.raises(ValueError):
        tokenizer.tokenize("P4_222")  # a space group without a token: '_' alone is unknown


def test_decode_rejects_out_of_range_ids(tokenizer):
    with pytest.raises(ValueError, match="outside"):
        tokenizer.decode([0, 377])


def test_prototype_training_texts_round_trip(tokenizer):
    for structure in all_prototypes().values():
        text = training_text(structure_to_model_cif(structure))
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
        assert tokenizer.decode(ids, skip_special_tokens=False) == normalised(text)


@pytest.mark.skipif(not MP20_SAMPLE.exists(), reason=f"{MP20_SAMPLE} not available")
def test_mp20_sample_round_trips(tokenizer):
    import pandas as pd
    from pymatgen.core import Structure

    cifs = pd.read_csv(MP20_SAMPLE)["cif"].sample(200, random_state=0)
    for cif in cifs:
        text = training_text(structure_to_model_cif(Structure.from_str(cif, fmt="cif")))
        ids = tokenizer.encode(text)
        assert len(ids) <= 1024
        assert tokenizer.decode(ids, skip_special_tokens=False) == normalised(text)
