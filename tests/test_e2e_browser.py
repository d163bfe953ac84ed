"""End to end in headless Chromium: start the app, move the sliders, generate 4 structures,
see them in the table, the 3D viewer and the Evaluate page, download and check the zip.

The model is a tiny PKV model that has memorised one NaCl CIF (trained here in seconds on
an idle CPU), so generation yields real, valid structures. Needs Debian's /usr/bin/chromium
and the local 3Dmol.js copy (scripts/fetch_3dmol.sh): in CI (CI set, as `.ci/run` does) a
missing one is a failure; elsewhere the test skips with the reason.
A screenshot goes to test-artifacts/ (git-ignored).
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
import zipfile
from pathlib import Path

import pytest
import torch
from app_server import CHROMIUM, REPO, AppServer, keep_every_sample, launch_chromium, open_page, press

THREEDMOL = REPO / "static" / "vendor" / "3Dmol-min.js"
ARTIFACTS = REPO / "test-artifacts"
TARGET_BAND_GAP = 1.5  # what the memorised CIF was trained with

MISSING = [reason for present, reason in (
    (CHROMIUM.exists(), "needs Debian chromium at /usr/bin/chromium (apt-get install chromium, or scripts/setup_tests.sh)"),
    (THREEDMOL.exists(), "needs the local 3Dmol.js: run scripts/fetch_3dmol.sh"),
) if not present]


@pytest.fixture(autouse=True)
def browser_prerequisites():
    """CI must run this test: there a missing prerequisite fails it; elsewhere it skips."""
    if MISSING:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("; ".join(MISSING))


def train_memorised_model(out_dir: Path) -> Path:
    """A 2-layer model that writes the rock-salt NaCl CIF (loss < 0.02 within a few hundred steps)."""
    from conftest import tiny_config
    from prototypes import rocksalt_nacl

    from crystallm_core.chem.cif.cif_format import structure_to_model_cif, training_text
    from crystallm_core.lm.checkpoints import save_model
    from crystallm_core.lm.conditions import condition_vector
    from crystallm_core.lm.model import CrystaLLMPKV
    from crystallm_core.lm.tokenizer import get_tokenizer

    ids = torch.tensor([get_tokenizer().encode(training_text(structure_to_model_cif(rocksalt_nacl())))])
    values, present = condition_vector(TARGET_BAND_GAP, 0.0)
    torch.manual_seed(0)
    model = CrystaLLMPKV(tiny_config(n_positions=ids.shape[1] + 8, cond_dropout=0.0))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(400):
        nll, count = model.sequence_loss(ids, torch.tensor([values]), torch.tensor([present]))
        loss = nll.sum() / count.sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if loss.item() < 0.02:
            break
    assert loss.item() < 0.05, f"the fixture model did not memorise its CIF (loss {loss.item():.3f})"
    return save_model(model, out_dir, metadata={"name": "memorised-nacl", "trained_on": "one NaCl CIF (test fixture)"})


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`streamlit run app.py` on a free port with the memorised model and a scratch history."""
    work = tmp_path_factory.mktemp("e2e")
    model_dir = train_memorised_model(work / "model")
    server = AppServer({"CRYSTALLM_MODEL_DIR": str(model_dir), "CRYSTALLM_HISTORY_DB": str(work / "history.sqlite")},
                       work / "streamlit.log")
    try:
        yield server.start(timeout=120)
    except RuntimeError as error:
        pytest.fail(str(error))
    finally:
        server.stop()


def table_cells(page) -> list[str]:
    """Text of the results table's cells: the grid is a canvas and shows its accessible cells once focused."""
    table = page.get_by_test_id("stDataFrame").first
    cells = table.locator("[role=gridcell]")  # a visually hidden table: not reachable by get_by_role
    for _ in range(20):
        if cells.count():
            break
        table.locator(".dvn-scroller").first.click(position={"x": 100, "y": 50})
        time.sleep(1)
    return [cell.inner_text() for cell in cells.all()]


def test_generate_view_evaluate_and_download(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    expect.set_options(timeout=60_000)  # a shared, busy CPU: be generous
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
            page.set_default_timeout(60_000)
            page.goto(app_url, wait_until="domcontentloaded")
            expect(page.get_by_text("memorised-nacl")).to_be_visible()
            open_page(page, "Generate")

            # Sliders by keyboard: band gap 1.50 → 2.00 (10 × 0.05), temperature 0.70 → 0.50 (4 × 0.05).
            press(page, page.get_by_role("slider", name="Target band gap (eV)"), "ArrowRight", 10)
            press(page, page.get_by_role("slider", name="Temperature"), "ArrowLeft", 4)
            page.get_by_label("Number of structures").fill("4")
            keep_every_sample(page)
            page.get_by_role("button", name="Generate", exact=True).click()
            expect(page.get_by_test_id("stProgress")).to_be_visible()
            expect(page.get_by_text("of 4 structures valid")).to_be_visible(timeout=600_000)

            # 4 rows × 12 columns; the data grid renders only the columns in the window (10 of them here)
            cells = table_cells(page)
            assert cells[:2] == ["0", "NaCl"] and len(cells) % 4 == 0 and 4 * 10 <= len(cells) <= 4 * 12
            page.screenshot(path=str(ARTIFACTS / "e2e_generate.png"), full_page=True)

            with page.expect_download(timeout=120_000) as download:
                page.get_by_role("button", name="Download zip").click()
            archive = zipfile.ZipFile(download.value.path())
            names = archive.namelist()
            cifs = [n for n in names if n.startswith("cifs/") and n.endswith(".cif")]
            assert cifs and "results.csv" in names and "manifest.json" in names
            rows = list(csv.DictReader(io.StringIO(archive.read("results.csv").decode())))
            assert len(rows) == 4 and rows[0]["formula"] == "NaCl"
            # the judges ship with the repository: a run the app scored must carry their readings (the app
            # once loaded CHGNet under the sampler's inference mode and every reading failed silently)
            assert all(r["e_hull_pred"] and r["band_gap_pred"] for r in rows if r["valid"] == "True"), rows
            manifest = json.loads(archive.read("manifest.json"))
            assert manifest["model"]["name"] == "memorised-nacl" and len(manifest["model"]["weights_sha256"]) == 64
            assert manifest["requests"][0]["band_gap"] == pytest.approx(2.0)
            assert manifest["requests"][0]["settings"]["temperature"] == pytest.approx(0.5)

            open_page(page, "Explore")
            expect(page.get_by_text("Powder XRD (Cu Kα)")).to_be_visible()
            viewer = page.frame_locator("iframe[data-testid=stIFrame]")
            expect(viewer.locator("canvas")).to_have_count(1, timeout=60_000)
            expect(page.get_by_text("Fm-3m (#225)")).to_be_visible()

            open_page(page, "Evaluate")
            expect(page.get_by_text("Valid → unique → novel → stable")).to_be_visible()
            if any(float(r["band_gap_pred"] or "nan") == float(r["band_gap_pred"] or "nan") for r in rows):
                expect(page.get_by_text("Target vs surrogate band gap")).to_be_visible()
            else:  # no surrogate weights shipped: the page must say so instead of plotting made-up numbers
                expect(page.get_by_text("Surrogate band gaps: not available")).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "e2e_evaluate.png"), full_page=True)
        finally:
            browser.close()
