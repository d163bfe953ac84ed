"""The app's upload paths on a folder of hostile CIFs, in a process of its own so its peak memory
can be measured (tests/test_crowding.py): every file uploaded on Explore, then the folder opened
on the Evaluate page (checked and scored there). Prints one JSON line of what each page said.

    CRYSTALLM_DATA_ROOTS=DIR python tests/hostile_app_session.py DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def page(name: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    return at.switch_page(name).run()


def main(folder: Path) -> dict:
    explore = {}
    for path in sorted(folder.glob("*.cif")):
        at = page("pages/explore.py")
        at.file_uploader(key="explore_upload").upload(path.name, path.read_bytes(), "chemical/x-cif")
        at.run()
        explore[path.name] = {"exception": [str(e.value) for e in at.exception],
                              "said": [str(e.value) for e in [*at.error, *at.warning, *at.info]],
                              "tables": [str(t.value) for t in at.table]}
    at = page("pages/evaluate.py")
    at.text_input(key="open_results_path").set_value(str(folder))
    next(b for b in at.button if b.label == "Open").click().run()
    run = at.session_state["run"] if "run" in at.session_state else None
    rows = [] if run is None else [{"file": c.file_name, "notes": c.scores.notes if c.scores else None,
                                    "reasons": c.reasons} for c in run.candidates]
    return {"explore": explore, "evaluate_exception": [str(e.value) for e in at.exception],
            "evaluate_errors": [str(e.value) for e in at.error], "evaluate_rows": rows}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
