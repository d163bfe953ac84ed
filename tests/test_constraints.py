"""Constrained decoding (issue 10): each constraint on hand-made token sequences, training CIFs
accepted as written, and the guarantee itself with a randomly initialised model."""
from __future__ import annotations

import re
import time
from dataclasses import replace

import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prototypes import all_prototypes

from crystallm_core.chem.cif.cif_format import (
    repair_generated_cif,
    structure_to_model_cif,
    training_text,
)
from crystallm_core.chem.decoding.constraints import (
    CifConstraint,
    CifTokens,
    ConstraintConfig,
    PromptMismatch,
)
from crystallm_core.chem.cif.prompts import build_prompt
from crystallm_core.chem.judges.validity import ValidityConfig, check_cif
from crystallm_core.chem.cif.wyckoff import crystal_system, number_of
from crystallm_core.lm.model import CrystaLLMPKV
from crystallm_core.lm.sampler import SamplingSettings, sample
from crystallm_core.lm.tokenizer import get_tokenizer

TOKENIZER = get_tokenizer()
TOKENS = CifTokens(TOKENIZER)


def text_of(ids) -> str:
    return TOKENIZER.decode(ids, skip_special_tokens=False)


def ids_of(*texts: str) -> list[int]:
    return [TOKENIZER.token_to_id[t] for t in texts]


def allowed_texts(constraint: CifConstraint) -> set[str]:
    return {TOKENIZER.vocab[i] for i in constraint.allowed()}


def feed(constraint: CifConstraint, choices: str) -> list[int]:
    """Make the model's choices (`choices` holds only the chosen tokens, e.g. "5.6400" or "Na",
    and "00000" for the coordinate 0.0000, whose '.' is forced); returns what was forced after."""
    forced: list[int] = []
    for token in TOKENIZER.encode(choices):
        assert token in constraint.allowed(), (TOKENIZER.vocab[token], allowed_texts(constraint))
        step = constraint.advance(token)
        assert step.rewind_to is None and step.gave_up is None, constraint.retries
        forced = step.forced
    return forced


def started(prompt: str, **config) -> tuple[CifConstraint, list[int]]:
    constraint = CifConstraint(TOKENS, ConstraintConfig(final_check=False, **config))
    return constraint, constraint.start(TOKENIZER.encode(prompt)).forced


def level4(formula: str, z: int, group: str) -> tuple[CifConstraint, list[int]]:
    return started(build_prompt(TOKENIZER, formula, z, group).text)


def after_the_check(constraint: CifConstraint, step):
    """A background final check: poll until it is in; its step's forced tokens follow the waiting one's."""
    while step.waiting:
        time.sleep(0.005)
        after = constraint.poll()
        if after is not None:
            step = replace(after, forced=step.forced + after.forced)
    return step


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("name", sorted(all_prototypes()))
def test_a_training_cif_is_accepted_token_by_token(name, background):
    """Everything the decoder forces is what the training format holds (the volume aside:
    ours comes from the 4-decimal cell, the data's from the unrounded one); the final check
    inline or in the background, the same."""
    text = training_text(structure_to_model_cif(all_prototypes()[name]))
    constraint = CifConstraint(TOKENS, background=background)
    ids = TOKENIZER.encode(text)
    forced = constraint.start(ids[:4]).forced
    position = 4 + len(forced)
    volume = re.compile(r"_cell_volume \[[\d.]+\]")
    while position < len(ids):
        assert ids[position] in constraint.allowed(), text_of(ids[:position + 1])[-80:]
        step = after_the_check(constraint, constraint.advance(ids[position]))
        assert step.rewind_to is None and step.gave_up is None, constraint.retries
        position += 1
        assert volume.sub("V", text_of(step.forced)) == volume.sub("V", text_of(ids[position:position + len(step.forced)]))
        position += len(step.forced)
        if step.finished:
            break
    assert step.finished and position == len(ids)


def test_cubic_group_forces_b_c_and_the_angles():
    constraint, forced = level4("NaCl", 4, "Fm-3m")
    assert text_of(forced) == "_cell_length_a ["
    forced = feed(constraint, "5.6400")
    text = text_of(forced)
    assert text.startswith("]\n_cell_length_b [5.6400]\n_cell_length_c [5.6400]\n_cell_angle_alpha [90.0000]")
    assert "_cell_angle_gamma [90.0000]\n_symmetry_Int_Tables_number [225]" in text
    assert "_chemical_formula_sum '[Na4 Cl4]'\n_cell_volume [179.4061]\n_cell_formula_units_Z [4]" in text


def test_hexagonal_group_forces_a_equals_b_and_gamma_120():
    constraint, _ = level4("ZnO", 2, "P6_3mc")
    text = text_of(feed(constraint, "3.2500"))
    assert text.startswith("]\n_cell_length_b [3.2500]\n_cell_length_c [")
    assert allowed_texts(constraint) <= set("0123456789")  # c is the model's to choose
    text = text_of(feed(constraint, "5.2100"))
    assert "_cell_angle_gamma [120.0000]" in text


def test_space_groups_that_cannot_hold_the_counts_are_masked():
    constraint, forced = started("<bos>\ndata_[Na1Cl1]\n")
    assert text_of(forced).endswith("_symmetry_space_group_name_H-M [")
    groups = {t[:-3] for t in allowed_texts(constraint)}
    assert {"P1", "Pm-3m", "P4/mmm"} <= groups
    assert not groups & {"Fm-3m", "Im-3m", "Fd-3m", "P2_1/c"}  # centred, or only even orbits
    with pytest.raises(PromptMismatch):  # two Na need both single points of Pm-3m: no room for Cl
        level4("NaCl", 2, "Pm-3m")


def test_multiplicities_that_overshoot_or_strand_atoms_are_masked():
    constraint, _ = level4("NaCl", 1, "Pm-3m")
    feed(constraint, "5.6400")
    assert allowed_texts(constraint) == {"Na", "Cl"}
    feed(constraint, "Na")
    assert allowed_texts(constraint) == {"1"}  # 3, 6, 8, 12… overshoot one Na
    constraint, _ = level4("SrTiO3", 1, "Pm-3m")
    feed(constraint, "3.9000O")
    # three O: 3c/3d; one O and two O cannot be written (the rest would need two single points)
    assert allowed_texts(constraint) == {"3"}


def test_the_site_loop_cannot_close_early_and_closes_itself():
    constraint, _ = level4("NaCl", 1, "Pm-3m")
    feed(constraint, "5.6400Na1 0000000000")
    assert "]" not in allowed_texts(constraint)
    forced = feed(constraint, "00000")
    assert text_of(forced) == " 1\n "
    assert allowed_texts(constraint) == {"Cl"}  # Na is used up
    forced = feed(constraint, "Cl1 050000500005000")
    assert text_of(forced) == " 1\n]\n<eos>"


def test_a_row_whose_orbit_disagrees_with_its_multiplicity_is_rewound():
    constraint, _ = level4("NaCl", 1, "Pm-3m")
    feed(constraint, "5.6400Na1 010000000")
    # (0.1, 0, z) is never a single point: the scan of z finds nothing. First only y is written
    # again, with the y that failed masked; when Y_RETRIES values of y failed, the whole row.
    step = constraint.advance(TOKENIZER.token_to_id["0"])
    assert step.rewind_to is not None and constraint.retries.row == 1 and constraint.retries.reasons == {"blocked": 1}
    assert text_of(constraint.history).endswith("Na0 1 0.1000 ") and "-" not in allowed_texts(constraint)
    feed(constraint, "0000")
    assert "0" not in allowed_texts(constraint)  # y = 0.0000 failed on this x
    step = constraint.advance(TOKENIZER.token_to_id["1"])  # y = 0.0001: blocked again
    assert step.rewind_to is not None and constraint.retries.row == 2
    assert text_of(constraint.history).endswith("[\n ") and allowed_texts(constraint) == {"Na", "Cl"}
    assert text_of(step.forced) == ""  # the re-fed ' ' gets fresh logits for the element


def test_atoms_too_close_are_rewound():
    constraint, _ = level4("NaCl", 1, "Pm-3m")
    feed(constraint, "5.6400Na1 000000000000000Cl1 0500005000")
    # Na took the single point 1a (0, 0, 0): one Cl at (½, ½, z) must be 1b, so only z = ½ is left
    assert allowed_texts(constraint) == {"0"}  # no "-0.0000"
    feed(constraint, "0")
    assert "0" not in allowed_texts(constraint) and "9" not in allowed_texts(constraint)
    assert "5" in allowed_texts(constraint)


def test_numbers_are_well_formed_and_in_range():
    constraint, _ = level4("NaCl", 4, "Fm-3m")
    assert "." not in allowed_texts(constraint)  # a number starts with a digit
    assert "0" not in allowed_texts(constraint)  # 0.x Å: an atom would sit on its own image
    feed(constraint, "1")
    assert "." not in allowed_texts(constraint)  # 1.x Å is too short as well; 1x Å is fine
    constraint, _ = level4("NaCl", 4, "Fm-3m")
    feed(constraint, "999")
    assert allowed_texts(constraint) == {"."}  # 1000 Å and beyond is outside the sane range


def test_the_formula_is_bounded_and_never_empty():
    constraint, _ = started("<bos>\ndata_[", max_atoms=6)
    assert "]" not in allowed_texts(constraint) and "Xe" not in allowed_texts(constraint)  # no radius for Xe
    feed(constraint, "Na")
    assert allowed_texts(constraint) == set("123456")
    feed(constraint, "4Cl")
    assert allowed_texts(constraint) == {"1", "2"}


def test_prompt_outside_the_grammar_is_refused():
    with pytest.raises(PromptMismatch, match="'Xe'"):
        started("<bos>\ndata_[Xe1F2]\n")


def test_rewound_cache_equals_a_fresh_decode():
    """Writing a row, rewinding it and writing another gives the cache a fresh decode gives."""
    torch.manual_seed(0)
    model = CrystaLLMPKV(tiny_config()).eval()
    cond = model.conditioning(torch.tensor([[0.3, 0.0]]))
    prefix, row, other = torch.randint(0, 370, (12,)), torch.randint(0, 370, (7,)), torch.randint(0, 370, (5,))
    with torch.inference_mode():
        cache = model.setup_cache(1, 64)
        cache.write_prefix(torch.tensor([0]), cond)
        model.forward_cached(prefix, torch.tensor([12]), cache)
        model.forward_cached(row, torch.tensor([7]), cache)
        cache.rewind(torch.tensor([0]), torch.tensor([2 + 11]))  # keep 11 tokens; re-feed the 12th
        rewound = model.forward_cached(torch.cat([prefix[-1:], other]), torch.tensor([6]), cache)
        fresh_cache = model.setup_cache(1, 64)
        fresh_cache.write_prefix(torch.tensor([0]), cond)
        fresh = model.forward_cached(torch.cat([prefix, other]), torch.tensor([17]), fresh_cache)
    n = 2 + 17
    assert torch.equal(cache.lengths, fresh_cache.lengths)
    for layer in range(model.config.n_layer):
        assert torch.allclose(cache.keys[layer][:, :, :n], fresh_cache.keys[layer][:, :, :n], atol=1e-6)
        assert torch.allclose(cache.values[layer][:, :, :n], fresh_cache.values[layer][:, :, :n], atol=1e-6)
    assert torch.allclose(rewound, fresh, atol=1e-5)


LATTICE_RULES = {  # what the stated crystal system demands of a, b, c, α, β, γ
    "triclinic": lambda a, b, c, al, be, ga: True,
    "monoclinic": lambda a, b, c, al, be, ga: al == ga == 90,
    "orthorhombic": lambda a, b, c, al, be, ga: al == be == ga == 90,
    "tetragonal": lambda a, b, c, al, be, ga: a == b and al == be == ga == 90,
    "trigonal": lambda a, b, c, al, be, ga: a == b and al == be == 90 and ga == 120,
    "hexagonal": lambda a, b, c, al, be, ga: a == b and al == be == 90 and ga == 120,
    "cubic": lambda a, b, c, al, be, ga: a == b == c and al == be == ga == 90,
}


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return CrystaLLMPKV(tiny_config(n_positions=1026)).eval()


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), band_gap=st.floats(0.0, 0.9), prompt=st.sampled_from([
    "<bos>\ndata_[", "<bos>\ndata_[Ti2O4]\n", "<bos>\ndata_[Li1Co1O2]\n",
    build_prompt(TOKENIZER, "NaCl", 4, "Fm-3m").text]))
def test_every_finished_cif_is_consistent_by_construction(random_model, seed, band_gap, prompt):
    """The guarantee comes from the decoder, not the weights: a random model's finished CIFs parse,
    add up, and state a space group their cell can have (bond lengths are the weights' business,
    so the final check is off here)."""
    config = ConstraintConfig(max_atoms=8, final_check=False)
    samples = sample(random_model, TOKENIZER.encode(prompt), [band_gap, 0.0], [True, True], 4,
                     SamplingSettings(batch_size=4, temperature=1.0, top_k=None, top_p=None), seed=seed,
                     constraint_factory=lambda: CifConstraint(TOKENS, config))
    finished = [s for s in samples if s.stop_reason == "eos"]
    for s in finished:
        repaired = repair_generated_cif(text_of(s.token_ids))
        assert repaired.cif, repaired.reason
        report = check_cif(repaired.cif, ValidityConfig(max_sites_for_bonds=0))  # (CrystalNN is slow in 900 Å cells)
        for name in ("parses", "formula_consistency", "multiplicity"):
            assert report.check(name).passed, report.failed_reasons
        tags = dict(re.findall(r"(_cell_\w+) (\S+)", repaired.cif))
        values = [float(tags[f"_cell_{k}"]) for k in ("length_a", "length_b", "length_c", "angle_alpha",
                                                      "angle_beta", "angle_gamma")]
        system = crystal_system(number_of(report.checks and re.search(r"H-M (\S+)", repaired.cif).group(1)))
        assert LATTICE_RULES[system](*values), (system, values)
    assert all(s.stop_reason in ("eos", "gave up", "length") for s in samples)


def test_the_background_check_writes_what_the_inline_check_writes():
    """With the shipped model (which reaches the final check), checking in the background while the
    other slots go on gives the samples the inline check gives, rewinds included. (In fp32: a
    slot's neighbours change with the timing, and in bf16 that rounding can flip a draw.)"""
    from crystallm_core.lm.checkpoints import load_model

    loaded = load_model(dtype=torch.float32)
    prompt = TOKENIZER.encode("<bos>\ndata_[")
    runs = {}
    for background in (False, True):
        samples = sample(loaded.model, prompt, [0.3, 0.0], [True, True], 6, SamplingSettings(batch_size=3), seed=4,
                         constraint_factory=lambda background=background: CifConstraint(TOKENS, background=background))
        runs[background] = [(s.token_ids, s.stop_reason, s.retries) for s in samples]
    assert runs[False] == runs[True]
    assert all(reason == "eos" for _, reason, _ in runs[True])
