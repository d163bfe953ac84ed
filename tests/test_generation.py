import json

import pytest
from prototypes import rutile_tio2

from crystallm_core.chem.cif.cif_format import structure_to_model_cif
from crystallm_core.chem.judges.isolation import check_sample
from crystallm_core.chem.cif.prompts import build_prompt
from crystallm_core.lm.checkpoints import load_model
from crystallm_core.lm.sampler import SamplingSettings
from crystallm_core.lm.tokenizer import get_tokenizer
from crystallm_core.product.cli import main
from crystallm_core.product.generation import (
    GenerationRequest,
    generate,
    prepare,
    sample_counts,
)
from crystallm_core.product.run_files import read_run, write_run


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def small_request(**overrides):
    settings = SamplingSettings(batch_size=4, max_tokens=48)
    values = dict(band_gap=1.5, e_hull=0.0, n=5, settings=settings, seed=3)
    values.update(overrides)
    return GenerationRequest(**values)


def test_generate_streams_every_candidate_with_reasons(tiny):
    seen = []
    run = generate(tiny, small_request(), on_candidate=seen.append)
    assert [c.index for c in run.candidates] == list(range(5)) and seen == run.candidates
    assert run.status == "done"
    for c in run.candidates:  # an untrained model writes garbage: each is invalid, with a reason
        assert not c.valid and c.reasons and c.band_gap_target == 1.5 and c.raw_text.startswith("<bos>")
    manifest = run.manifest()
    assert manifest["model"]["weights_sha256"] == tiny.info.weights_sha256
    assert manifest["requests"][0]["band_gap"] == 1.5 and manifest["requests"][0]["e_hull"] == 0.0
    assert manifest["requests"][0]["seed"] == 3 and manifest["requests"][0]["settings"]["top_k"] == 15
    assert manifest["requests"][0]["settings"]["decoding"] == "constrained"
    assert manifest["generation"][0]["n_finished"] == 5 and "rewinds" in manifest["generation"][0]
    assert {"torch", "transformers", "pymatgen", "python"} <= set(manifest["versions"])


def test_same_seed_same_candidates(tiny):
    first = [c.raw_text for c in generate(tiny, small_request()).candidates]
    assert first == [c.raw_text for c in generate(tiny, small_request()).candidates]


def test_cancel_keeps_finished(tiny):
    seen = []
    run = generate(tiny, small_request(n=8, settings=SamplingSettings(batch_size=1, max_tokens=24)),
                   on_candidate=seen.append, should_cancel=lambda: len(seen) >= 3)
    assert run.status == "cancelled" and len(run.candidates) == 3 and run.generation[0]["n_finished"] == 3


def test_stop_after_valid_stops_once_enough_are_valid(tiny, monkeypatch):
    from crystallm_core.chem.judges.validity import CheckResult, ValidityReport
    from crystallm_core.product import generation

    calls = []

    def every_other_valid(text, stop_reason, max_tokens, note=None):
        calls.append(text)
        return "cif", ValidityReport([CheckResult("parses", len(calls) % 2 == 0, "fake")])

    monkeypatch.setattr(generation, "check_sample", every_other_valid)
    request = small_request(n=12, stop_after_valid=3, settings=SamplingSettings(batch_size=1, max_tokens=24))
    run = generate(tiny, request)
    assert run.n_valid == 3 and len(run.candidates) == 6 and run.status == "done"
    assert run.manifest()["requests"][0]["stop_after_valid"] == 3 and run.manifest()["n_valid"] == 3


def test_stop_after_valid_draws_every_sample_when_none_is_valid(tiny):
    run = generate(tiny, small_request(n=4, stop_after_valid=2))  # the untrained model writes no valid CIF
    assert len(run.candidates) == 4 and run.status == "done" and run.n_valid == 0


def test_several_requests_fill_one_run_numbered_throughout(tiny):
    run = generate(tiny, small_request(n=2))
    generate(tiny, small_request(n=3, band_gap=3.0), run)
    assert [c.index for c in run.candidates] == list(range(5)) and len(run.generation) == 2
    assert [c.band_gap_target for c in run.candidates] == [1.5, 1.5, 3.0, 3.0, 3.0]


def test_sample_counts():
    assert sample_counts(8) == {"n": 8, "stop_after_valid": None}
    assert sample_counts(8, until_valid=True) == {"n": 32, "stop_after_valid": 8}
    assert sample_counts(8, True, 10)["n"] == 10 and sample_counts(200, True)["n"] == 256


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(stop_after_valid=0), "between 1 and the number of samples"),
        (dict(n=4, stop_after_valid=5), r"between 1 and the number of samples \(4\), got 5"),
        (dict(band_gap=float("nan")), "band gap must be a finite"),
        (dict(band_gap=-1.0), "band gap must be ≥ 0"),
        (dict(e_hull=9.0), "E_hull must be ≤"),
        (dict(n=0), "between 1 and 256"),
        (dict(composition="Xx2O3"), "'Xx' .* not a chemical element"),
        (dict(composition="Ti O2 !!"), "not a chemical formula"),
        (dict(composition="Li10Fe5P5O20"), "at most 20"),
        (dict(composition="TiO2", spacegroup="P 7"), "not one the model knows"),
        (dict(composition="NaCl", z=1, spacegroup="Fm-3m"), "F-centred: every element count"),
        (dict(elements=["Li", "Qq"]), "not chemical elements: Qq"),
        (dict(composition="TiO2", elements=["Ti", "S"]), "uses O, which the element set excludes"),
    ],
)
def test_bad_requests_are_clear_value_errors(tiny, overrides, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny, small_request(**overrides))


def test_element_set_bans_every_other_element(tiny):
    # The sampler never emits banned ids (tests/test_sampler.py); here: the set becomes the right bans.
    prepared = prepare(tiny, small_request(elements=["Li", "O"]))
    vocab = tiny.tokenizer.vocab
    allowed_elements = {vocab[i] for i in range(89)} - {vocab[i] for i in prepared.banned_ids}
    assert allowed_elements == {"Li", "O"}
    assert generate(tiny, small_request(elements=["Li", "O"], n=1)).requests[0]["elements"] == ["Li", "O"]


def test_prompt_levels():
    tokenizer = get_tokenizer()
    assert build_prompt(tokenizer).text == "<bos>\ndata_["
    level2 = build_prompt(tokenizer, "TiO2", z=2)
    assert level2.text == "<bos>\ndata_[Ti2O4]\n" and level2.level == 2
    level4 = build_prompt(tokenizer, "TiO2", z=2, spacegroup="P4_2/mnm")
    assert level4.level == 4
    # A level-4 prompt is exactly the start of the training CIF of that structure.
    assert ("<bos>\n" + structure_to_model_cif(rutile_tio2())).startswith(level4.text)
    assert tokenizer.tokenize(level4.text)[-4:] == ["[", "P4_2/mnm_sg", "]", "\n"]


def test_a_real_cif_passes_and_garbage_gets_a_reason():
    cif_text = structure_to_model_cif(rutile_tio2())
    repaired, report = check_sample(cif_text, "eos", 1024)
    assert repaired is not None and report.valid, report.failed_reasons
    repaired, report = check_sample("data_[Ti2O4]\n_cell_length_a [4.", "length", 1024)
    assert not report.valid and "context limit" in report.failed_reasons[0]


def test_written_run_reads_back(tiny, tmp_path):
    run = generate(tiny, small_request(n=3))
    write_run(run, tmp_path / "run")
    assert len(list((tmp_path / "run" / "invalid").glob("*.cif"))) == 3
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["n_candidates"] == 3
    assert [c.name for c in read_run(tmp_path / "run").candidates] == [c.name for c in run.candidates]
    with pytest.raises(ValueError, match="already holds another run"):
        write_run(run, tmp_path / "run")  # never mix two runs under one manifest


GENERATE = ["generate", "--band-gap", "1.5", "--e-hull", "0.0", "--seed", "1", "--batch-size", "2", "--no-score"]


def test_cli_generate_writes_a_run(tiny_model_dir, tmp_path, capsys):
    code = main([*GENERATE, "-n", "2", "--out", str(tmp_path / "x"), "--model", str(tiny_model_dir)])
    assert code == 0
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["n_candidates"] == 2 and (tmp_path / "x" / "results.csv").is_file()
    assert "sampling: 100%" in capsys.readouterr().err  # a tqdm bar with ETA on stderr


def test_cli_resumes_an_interrupted_run_without_drawing_a_sample_twice(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A run killed after 2 of 5 samples: the same command finishes it with 3 new ones."""
    from crystallm_core.product import generate_cli

    out = tmp_path / "x"
    real_generate = generate
    seen = []

    def dies_after_two(loaded, request, run, on_candidate=None, should_cancel=None):
        def arrived(candidate):
            on_candidate(candidate)
            seen.append(candidate.raw_text)
            if len(seen) == 2:
                raise KeyboardInterrupt  # as Ctrl-C or kill would stop it
        return real_generate(loaded, request, run, on_candidate=arrived, should_cancel=should_cancel)

    import crystallm_core.product.generation as generation
    monkeypatch.setattr(generation, "generate", dies_after_two)
    assert main([*GENERATE, "-n", "5", "--out", str(out), "--model", str(tiny_model_dir)]) == 130
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running" and len(list(out.glob("*/*.cif"))) == 2
    monkeypatch.setattr(generation, "generate", real_generate)
    assert main([*GENERATE, "-n", "5", "--out", str(out), "--model", str(tiny_model_dir)]) == 0
    assert "resuming" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["n_candidates"] == 5 and len(manifest["generation"]) == 1
    texts = [p.read_text() for p in sorted(out.glob("*/*.cif"))]
    assert len(texts) == 5 and sorted(p.name[:3] for p in out.glob("*/*.cif")) == ["000", "001", "002", "003", "004"]
    assert main([*GENERATE, "-n", "5", "--out", str(out), "--model", str(tiny_model_dir)]) == 2  # finished: no rerun
    assert generate_cli.continuation_seed(1, 2) != 1


def test_cli_until_valid_says_when_it_fell_short(tiny_model_dir, tmp_path, capsys):
    code = main(["generate", "--band-gap", "1", "-n", "1", "--until-valid", "--max-samples", "2", "--out",
                 str(tmp_path / "x"), "--model", str(tiny_model_dir), "--batch-size", "2", "--no-score"])
    assert code == 0
    assert "only 0 of the 1 valid structures asked for after 2 samples" in capsys.readouterr().err
    assert json.loads((tmp_path / "x" / "manifest.json").read_text())["requests"][0]["stop_after_valid"] == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--band-gap", "-3", "--out", "x"], "band gap must be ≥ 0"),
        (["generate", "--band-gap", "abc", "--out", "x"], "invalid optional_float value"),
        (["generate", "--out", "x"], "required"),
        (["generate", "--band-gap", "1", "--max-samples", "9", "--out", "x"], "only applies with --until-valid"),
        (["generate", "--band-gap", "1", "--best-of", "2", "--until-valid", "--out", "x"], "cannot be combined"),
    ],
)
def test_cli_bad_arguments_one_line_exit_2(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err


def test_prepare_for_requests_leaves_the_checker_running(tiny):
    """The app prepares a model before its first request: kernels, thread count, the checker."""
    from crystallm_core.chem.judges.isolation import CHECKER
    from crystallm_core.product.generation import prepare_for_requests

    CHECKER.stop()
    figures = prepare_for_requests(tiny)
    assert figures["threads"] >= 1 and figures["seconds"] > 0
    assert CHECKER.process is not None and CHECKER.process.poll() is None


def test_cli_best_of_marks_every_sample_and_says_when_none_is_within_tolerance(tiny_model_dir, tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "x"
    code = main([*GENERATE, "-n", "2", "--best-of", "2", "--out", str(out), "--model", str(tiny_model_dir)])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_candidates"] == 4 and manifest["requests"][0]["keep_best"] == 2
    assert manifest["generation"][0]["best_of"]["picked"] == 0  # an untrained model writes nothing valid
    table = pd.read_csv(out / "results.csv")
    assert not table["picked"].any() and (table["picked_from"] == 4).all() and "score" in table
    assert "0 of 4 samples were within the tolerance" in capsys.readouterr().err


def test_best_of_requests_are_checked(tiny):
    with pytest.raises(ValueError, match="cannot be combined"):
        prepare(tiny, small_request(n=4, keep_best=2, stop_after_valid=1))
    with pytest.raises(ValueError, match="to keep must be between 1"):
        prepare(tiny, small_request(n=4, keep_best=5))
