"""The first sight of the app: the app's own navigation is set up before anything slow is
imported, so a fresh server never shows the raw file list of pages/ (issue 24)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_app_pages import new_app

REPO = Path(__file__).resolve().parents[1]

# app.py with st.navigation replaced by a probe: what was imported when the navigation was built?
PROBE = """
import sys
import streamlit as st

def probe(pages, **options):
    print(sorted(name for name in ("torch", "pymatgen", "crystallm_core") if name in sys.modules), len(pages))
    raise SystemExit(0)

st.navigation = probe
exec(compile(open("app.py").read(), "app.py", "exec"))
"""


def test_navigation_comes_before_any_slow_import():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[] 7", result.stdout  # nothing slow imported; the 7 pages


def test_home_page_shows_the_tool_and_the_loaded_model(app_env):
    at = new_app()
    assert at.title[0].value == "CrystaLLM Studio"
    assert any(s.value == "Loaded model" for s in at.subheader)
    assert any("tiny-test-model" in m.value for m in at.markdown)
