"""The Fine-tune page through AppTest: data only from inside the data roots, a clear message for
unusable data, and a run that ends in a model the Home page's roots accept ("Use this model")."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from streamlit.testing.v1 import AppTest
from test_finetune import user_table

from crystallm_core.lm.checkpoints import save_model
from crystallm_core.lm.model import CrystaLLMPKV

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def model_dir(root: Path, n_positions: int) -> Path:
    torch.manual_seed(0)
    return save_model(CrystaLLMPKV(tiny_config(n_positions=n_positions)), root, metadata={"name": "tiny-test-model"})


@pytest.fixture
def page_env(tmp_path, monkeypatch):
    """Default model inside the model roots, a data root holding a user table, fresh history."""
    data = tmp_path / "data"
    data.mkdir()
    user_table(20).rename(columns={"structure_cif": "cif", "gap": "band_gap"}).to_csv(data / "mine.csv", index=False)
    monkeypatch.setenv("CRYSTALLM_MODEL_ROOTS", str(tmp_path / "models"))
    monkeypatch.setenv("CRYSTALLM_FINETUNE_DIR", str(tmp_path / "models" / "tuned"))
    monkeypatch.setenv("CRYSTALLM_DATA_ROOTS", str(data))
    monkeypatch.setenv("CRYSTALLM_HISTORY_DB", str(tmp_path / "history.sqlite"))
    return tmp_path


def open_page(path_text: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/finetune.py").run()
    at.radio(key="ft_kind").set_value("A file or folder on the server").run()
    at.text_input(key="ft_path").set_value(path_text).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def run_to_end(at: AppTest, timeout: float = 180) -> AppTest:
    next(b for b in at.button if b.label == "Start fine-tuning").click().run()
    deadline = time.time() + timeout
    while "finetune_job" in at.session_state and time.time() < deadline:
        time.sleep(0.5)
        at.run()
    assert "finetune_job" not in at.session_state, "fine-tuning did not finish in time"
    return at


def errors(at: AppTest) -> str:
    return " | ".join(str(e.value) for e in at.error)


@pytest.mark.parametrize("path", ["/etc/passwd", "{root}/data/../history.sqlite"])
def test_a_path_outside_the_data_roots_is_refused(page_env, monkeypatch, path):
    monkeypatch.setenv("CRYSTALLM_MODEL_DIR", str(model_dir(page_env / "models" / "base", 66)))
    at = open_page(path.format(root=page_env))
    assert "outside the folders this server reads fine-tuning data from" in errors(at)
    assert "Start fine-tuning" not in [b.label for b in at.button]  # no column mapping, no Start button


def test_unusable_rows_give_a_clear_message(page_env, monkeypatch):
    monkeypatch.setenv("CRYSTALLM_MODEL_DIR", str(model_dir(page_env / "models" / "base", 66)))  # 64-token context
    at = open_page(str(page_env / "data" / "mine.csv"))
    assert at.selectbox(key="ft_cif").value == "cif" and at.selectbox(key="ft_gap").value == "band_gap"
    at = run_to_end(at)
    assert "none of the 20 rows can be used" in errors(at) and "too long" in errors(at)


def test_finetune_then_use_the_model(page_env, monkeypatch):
    monkeypatch.setenv("CRYSTALLM_MODEL_DIR", str(model_dir(page_env / "models" / "base", 512)))
    at = open_page(str(page_env / "data" / "mine.csv"))
    at.text_input(key="ft_name").set_value("mine-v1")
    at.slider(key="ft_minutes").set_value(1)
    at.number_input(key="ft_epochs").set_value(1)
    at = run_to_end(at)
    assert not errors(at), errors(at)
    job = at.session_state["finetune_result"]
    assert job.status == "done" and (page_env / "models" / "tuned" / "mine-v1" / "MODEL_CARD.md").is_file()
    next(b for b in at.button if b.label == "Use this model").click().run()
    assert not errors(at), errors(at)
    assert at.session_state["model_source"] == str(page_env / "models" / "tuned" / "mine-v1")


def test_uploads_are_mapped_and_held_to_the_size_limit(page_env, monkeypatch):
    monkeypatch.setenv("CRYSTALLM_MODEL_DIR", str(model_dir(page_env / "models" / "base", 66)))
    monkeypatch.setenv("CRYSTALLM_MAX_UPLOAD_MB", "1")
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/finetune.py").run()
    content = (page_env / "data" / "mine.csv").read_bytes()
    at.file_uploader(key="ft_upload").upload("mine.csv", content, "text/csv").run()
    assert not at.exception and not at.error, errors(at)
    assert at.selectbox(key="ft_cif").value == "cif"
    at.file_uploader(key="ft_upload").upload("big.csv", b"cif\n" + b"x" * 2**21, "text/csv").run()
    assert "accepts uploads up to 1 MB" in errors(at)


def test_explore_upload_is_held_to_the_size_limit(page_env, monkeypatch):
    monkeypatch.setenv("CRYSTALLM_MODEL_DIR", str(model_dir(page_env / "models" / "base", 66)))
    monkeypatch.setenv("CRYSTALLM_MAX_UPLOAD_MB", "1")
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/explore.py").run()
    at.file_uploader(key="explore_upload").upload("huge.cif", b"data_x\n" + b"#" * 2**21, "chemical/x-cif").run()
    assert not at.exception and "accepts uploads up to 1 MB" in errors(at)


# ---- the "Aim at a target region" tab (reward fine-tuning) -----------------------------------
def open_align_tab(page_env, monkeypatch) -> AppTest:
    monkeypatch.setenv("CRYSTALLM_MODEL_DIR", str(model_dir(page_env / "models" / "base", 66)))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/finetune.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert [tab.label for tab in at.tabs] == ["Your structures", "Aim at a target region"]
    return at


def start_button(at: AppTest):
    return next(b for b in at.button if b.label == "Start reward fine-tuning")


@pytest.mark.parametrize("key, value, message", [
    ("align_elements", "Xx, O", "not chemical elements: Xx"),
    ("align_name", "../elsewhere", "name the model with letters"),
])
def test_a_bad_region_gives_a_message(page_env, monkeypatch, key, value, message):
    at = open_align_tab(page_env, monkeypatch)
    assert at.slider(key="align_gaps").value == (2.0, 3.0) and at.number_input(key="align_rounds").value == 4
    at.text_input(key=key).set_value(value)
    start_button(at).click().run()
    assert not at.exception and message in errors(at), errors(at)
    assert "align_job" not in at.session_state and not (page_env / "models" / "tuned").exists()


def test_a_finished_job_shows_its_reports_and_model(page_env, monkeypatch):
    from crystallm_core.product.align_settings import AlignSettings
    from crystallm_core.product.align_job import AlignJob, TargetRegion

    at = open_align_tab(page_env, monkeypatch)
    out = model_dir(page_env / "models" / "tuned" / "oxides", 66)
    job = AlignJob(out, None, TargetRegion(2.0, 3.0, 0.0, ["O"]), AlignSettings(rounds=2))
    job.status, job.model_dir, job.stopped = "done", out, "time budget of 1 min reached"
    job.reports = [{"round": 0, "n": 24, "stable": 0.125, "vsun": 0.0833, "valid_unique_novel": 0.75, "hit": 0.25,
                    "median_e_hull": 0.41, "band_gap_spearman": 0.3, "median_e_hull_relaxed": 0.2, "accepted": True,
                    "seconds": 150.0}]
    at.session_state["align_result"] = job
    at.run()
    assert not at.exception and not at.error, errors(at)
    table = next(frame.value for frame in at.dataframe if "VSUN" in frame.value)
    assert table["round"].tolist() == [1] and table["stable"].tolist() == [12.5]
    assert any("time budget" in info.value for info in at.info)
    assert any(str(out) in text.value for text in at.markdown)
    assert any(b.label == "Use this model" for b in at.button)


def test_a_running_job_shows_round_progress_and_cancels(page_env, monkeypatch):
    from crystallm_core.product.align_settings import AlignSettings
    from crystallm_core.product.align_job import AlignJob, TargetRegion

    at = open_align_tab(page_env, monkeypatch)
    job = AlignJob(page_env / "models" / "tuned" / "oxides", None, TargetRegion(2.0, 3.0), AlignSettings(rounds=4))
    job.status, job.started_at = "running", time.time() - 120  # a thread that is not there: the page only polls
    job.reports = [{"round": 0, "n": 24, "stable": 0.1, "accepted": True, "seconds": 100.0}]
    at.session_state["align_job"] = job
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "round 1/4" in at.get("progress")[0].proto.text and "ETA 6:" in at.get("progress")[0].proto.text
    next(b for b in at.button if b.label == "Cancel").click().run()
    assert job._cancel.is_set()


def test_a_queued_region_job_shows_its_place_and_cancels(page_env, monkeypatch):
    from crystallm_core.product.jobs import GENERATION_QUEUE

    at = open_align_tab(page_env, monkeypatch)
    at.text_input(key="align_name").set_value("oxides")
    at.text_input(key="align_required").set_value("O")
    ahead = GENERATION_QUEUE.join()  # another job holds the CPU: this one waits in the queue
    try:
        start_button(at).click().run()
        assert not at.exception and not at.error, errors(at)
        job = at.session_state["align_job"]
        assert job.settings.required_elements == ["O"] and job.settings.grid == [(2.0, 0.0), (2.5, 0.0), (3.0, 0.0)]
        assert any("position 1 in the queue" in info.value for info in at.info)
        next(b for b in at.button if b.label == "Cancel").click().run()
        assert job.join(timeout=10)
        at.run()
    finally:
        GENERATION_QUEUE.leave(ahead)
    assert "align_job" not in at.session_state and at.session_state["align_result"].status == "cancelled"
    assert any("no model was written" in warning.value for warning in at.warning)
    assert not (page_env / "models" / "tuned" / "oxides").exists()
