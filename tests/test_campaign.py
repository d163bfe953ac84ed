"""Screening campaigns: spec validation, Ray against one process, resuming after the driver dies."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from crystallm_core.product.campaign import campaign_run, campaign_status, run_campaign
from crystallm_core.product.campaign_spec import chunk_seed, load_spec, parse_spec
from crystallm_core.product.cli import main

REPO = Path(__file__).resolve().parents[1]


def spec_data(model_dir, **overrides) -> dict:
    data = {"samples_per_target": 4, "chunk_size": 2, "seed": 5, "model": str(model_dir),
            "targets": {"band_gap": {"start": 0.5, "stop": 1.5, "step": 1.0}, "e_hull": [0.0]},
            "sampling": {"batch_size": 2, "max_tokens": 48},
            "scores": {"surrogate": False, "stability": False, "novelty": False}}
    data.update(overrides)
    return data


def rows(directory: Path) -> pd.DataFrame:
    return pd.read_parquet(directory / "rows").drop(columns="seconds").sort_values(
        ["target", "chunk", "index"], ignore_index=True)


def test_spec_grid_chunks_and_seeds(tiny_model_dir):
    spec = parse_spec(spec_data(tiny_model_dir, samples_per_target=5))
    assert [(t.band_gap, t.e_hull) for t in spec.targets()] == [(0.5, 0.0), (1.5, 0.0)]
    items = spec.work_items()
    assert [(i.target.index, i.chunk, i.n) for i in items] == [(0, 0, 2), (0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 1, 2),
                                                               (1, 2, 1)]
    assert len({i.seed for i in items}) == 6 and items[4].seed == chunk_seed(5, 1, 1)


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown key in the spec: bogus"),
    ({"targets": {"band_gap": []}}, "targets.band_gap is empty"),
    ({"targets": {"band_gap": [-1.0]}}, "band gap must be ≥ 0"),
    ({"targets": {"band_gap": {"start": 1, "stop": 0, "step": 0.5}}}, "stop ≥ start"),
    ({"scores": {"alignn": True}}, "unknown key in [scores]: alignn"),
    ({"sampling": {"temperature": 0}}, "temperature must be in"),
    ({"chunk_size": 0}, "chunk_size must be between 1 and 256"),
])
def test_a_bad_spec_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, change, message):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec_data(tiny_model_dir, **change)))
    assert main(["campaign", str(path), "--out", str(tmp_path / "out"), "--local"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_toml_and_json_say_the_same(tiny_model_dir, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(spec_data(tiny_model_dir)))
    (tmp_path / "a.toml").write_text(f'samples_per_target = 4\nchunk_size = 2\nseed = 5\nmodel = "{tiny_model_dir}"\n'
                                     "[targets]\nband_gap = {start = 0.5, stop = 1.5, step = 1.0}\ne_hull = [0.0]\n"
                                     "[sampling]\nbatch_size = 2\nmax_tokens = 48\n"
                                     "[scores]\nsurrogate = false\nstability = false\nnovelty = false\n")
    assert load_spec(tmp_path / "a.json") == load_spec(tmp_path / "a.toml")


def test_ray_rows_equal_one_process_rows(tiny_model_dir, tmp_path):
    spec = parse_spec(spec_data(tiny_model_dir))
    summary = run_campaign(spec, tmp_path / "local", backend="local", progress=False)
    run_campaign(spec, tmp_path / "ray", workers=2, progress=False)
    pd.testing.assert_frame_equal(rows(tmp_path / "local"), rows(tmp_path / "ray"))
    assert len(rows(tmp_path / "ray")) == 8 and summary["n"].tolist() == [4, 4]
    assert campaign_status(tmp_path / "ray").startswith("done: 8/8 samples in 4 chunks")
    manifest = json.loads((tmp_path / "ray" / "campaign.json").read_text())
    assert manifest["model"]["name"] == "tiny-test-model" and manifest["chunks"] == 4


def test_a_killed_driver_resumes_with_every_chunk_exactly_once(tiny_model_dir, tmp_path):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec_data(tiny_model_dir, samples_per_target=12)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "crystallm_core", "campaign", str(spec_path), "--out", str(out), "--local",
               "--no-progress"]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list((out / "rows").glob("*.parquet"))) < 2 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    driver.kill()  # as kill -9
    driver.wait()
    partial = {p.name for p in (out / "rows").glob("*.parquet")}
    assert 2 <= len(partial) < 12
    assert "running" in campaign_status(out)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = rows(out)
    assert len(resumed) == 24 and not resumed.duplicated(["target", "chunk", "index"]).any()
    reference = tmp_path / "reference"
    run_campaign(load_spec(spec_path), reference, backend="local", progress=False)
    pd.testing.assert_frame_equal(resumed, rows(reference))  # as if it had never stopped


def test_a_campaign_opens_as_one_run_with_its_stored_checks(tiny_model_dir, tmp_path):
    spec = parse_spec(spec_data(tiny_model_dir))
    run_campaign(spec, tmp_path / "c", backend="local", progress=False)
    stored = rows(tmp_path / "c")
    run = campaign_run(tmp_path / "c")
    frame = run.to_frame(unique=False)
    assert run.kind == "campaign" and len(run.candidates) == len(stored) == 8
    assert frame["valid"].tolist() == stored["valid"].tolist()
    assert frame["band_gap_target"].tolist() == stored["band_gap_target"].tolist()
    assert [r for r in frame["reason"] if r] == [r for r in stored["reason"] if r]  # reasons as stored
    with pytest.raises(ValueError, match="holds no campaign"):
        campaign_run(tmp_path)


def test_top_csv_ranks_by_score_and_best_of_picks_per_target_without_padding():
    from crystallm_core.product.campaign import top_candidates

    def row(target, index, gap, hull, valid=True, hit=None):
        return dict(target=target, index=index, file=f"t{target}_{index}.cif", formula="X", space_group="P1",
                    valid=valid, band_gap_target=2.0 if target == 0 else 4.0, band_gap_pred=gap, band_gap_std=0.2,
                    p_metal=0.0, e_hull_target=0.0, e_hull_pred=hull, unique=None, novel=True,
                    hit=hit if hit is not None else abs(gap - (2.0 if target == 0 else 4.0)) <= 0.5)

    table = pd.DataFrame([row(0, 0, 2.0, 0.3), row(0, 1, 2.1, 0.0), row(0, 2, 0.5, 0.0), row(0, 3, 2.0, 0.0, False),
                          row(1, 0, 1.0, 0.0), row(1, 1, 3.9, 0.05), row(1, 2, 0.0, 0.0), row(1, 3, 0.2, 0.0)])
    top = top_candidates(table)
    assert top["file"].tolist()[:2] == ["t0_1.cif", "t1_1.cif"] and top["score"].is_monotonic_decreasing
    picked = top_candidates(table, best_of=2)  # 2 of 4 per target: target 1 has one within tolerance only
    assert picked["file"].tolist() == ["t0_1.cif", "t0_0.cif", "t1_1.cif"]
    assert (picked["picked_from"] == 4).all()


def test_spec_best_of_is_checked_and_absent_by_default(tiny_model_dir):
    assert "best_of" not in parse_spec(spec_data(tiny_model_dir)).to_dict()
    assert parse_spec(spec_data(tiny_model_dir, best_of=4)).best_of == 4
    with pytest.raises(ValueError, match="best_of must be between"):
        parse_spec(spec_data(tiny_model_dir, best_of=0))
