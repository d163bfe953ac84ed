"""Fine-tuning on a user's table: 50 prototype-derived structures, a few steps on the tiny model."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from prototypes import all_prototypes
from pymatgen.io.cif import CifWriter

from crystallm_core.chem.data.user_data import ColumnMap, user_rows
from crystallm_core.lm.checkpoints import load_model
from crystallm_core.product.cli import main
from crystallm_core.product.finetune import FineTuneSettings, finetune
from crystallm_core.product.generation import GenerationRequest, generate
from crystallm_core.product.service import SamplingSettings

SUBSTITUTES = {"NaCl": [{}, {"Na": "K"}, {"Na": "Li"}, {"Cl": "Br"}, {"Na": "K", "Cl": "Br"}, {"Na": "Rb"}],
               "Si": [{}, {"Si": "Ge"}, {"Si": "C"}], "TiO2": [{}, {"Ti": "Sn"}, {"Ti": "Ge"}, {"Ti": "Mn"}],
               "SrTiO3": [{}, {"Sr": "Ba"}, {"Sr": "Ca"}, {"Ti": "Zr"}],
               "ZnO": [{}, {"Zn": "Be"}, {"O": "S"}], "Cu": [{}, {"Cu": "Ag"}, {"Cu": "Au"}]}


def user_table(n: int = 50) -> pd.DataFrame:
    """n structures: prototypes with substituted elements and strained cells, with band gaps."""
    rows, prototypes = [], all_prototypes()
    while len(rows) < n:
        for name, swaps in SUBSTITUTES.items():
            for swap in swaps:
                if len(rows) == n:
                    break
                structure = prototypes[name].copy()
                structure.replace_species(swap)
                structure.scale_lattice(structure.volume * (1 + 0.02 * (len(rows) % 5)))
                rows.append({"name": f"s{len(rows)}", "structure_cif": str(CifWriter(structure)),
                             "gap": 0.1 * (len(rows) % 30), "ehull": "" if len(rows) % 4 else 0.01})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    """The tiny random model with a 510-token context (the prototypes' CIFs need up to ~370)."""
    from conftest import tiny_config

    from crystallm_core.lm.checkpoints import save_model
    from crystallm_core.lm.model import CrystaLLMPKV

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base_model")
    save_model(CrystaLLMPKV(tiny_config(n_positions=512)), out, metadata={"name": "tiny-test-model"})
    return out


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    table = user_table()
    bad = pd.DataFrame([{"name": "broken", "structure_cif": "data_x\n_cell_length_a 1\n", "gap": 1.0, "ehull": 0.0},
                        {"name": "hot", "structure_cif": table["structure_cif"][0], "gap": 25.0, "ehull": 0.0},
                        {"name": "word", "structure_cif": table["structure_cif"][1], "gap": "high", "ehull": 0.0}])
    path = tmp_path_factory.mktemp("user") / "mine.csv"
    pd.concat([table, bad]).to_csv(path, index=False)
    return path


COLUMNS = ColumnMap(cif="structure_cif", band_gap="gap", e_hull="ehull", id="name")


def test_rows_are_read_with_reasons_for_bad_properties(table_file):
    rows, rejected = user_rows(table_file, COLUMNS)
    assert len(rows) == 51  # 50 good + the broken CIF (rejected later, by the converter)
    reasons = rejected.set_index("id")["reason"]
    assert reasons["hot"].startswith("out-of-range property: band_gap 25")
    assert reasons["word"].startswith("not a number: band_gap")
    assert rows["e_hull"].isna().sum() > 0  # empty cells are "unknown"


def test_a_folder_of_cifs_with_labels_by_file_name(tmp_path):
    folder = tmp_path / "cifs"
    folder.mkdir()
    table = user_table(3)
    for name, text in zip(table["name"], table["structure_cif"]):
        (folder / f"{name}.cif").write_text(text)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"file": ["s0.cif", "s2"], "gap": [1.5, 2.5]}).to_csv(labels, index=False)
    rows, rejected = user_rows(folder, ColumnMap(id="file", band_gap="gap"), labels)
    gaps = rows.set_index("id")["band_gap"]
    assert rejected.empty and gaps["s0.cif"] == 1.5 and gaps["s2.cif"] == 2.5 and pd.isna(gaps["s1.cif"])
    assert rows["cif"].str.startswith("# generated using pymatgen").all()


def test_a_path_column_cannot_leave_the_table_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "secret.cif").write_text("data_secret\n")
    table = tmp_path / "data" / "paths.csv"
    pd.DataFrame({"path": ["../secret.cif", "missing.cif"]}).to_csv(table, index=False)
    rows, rejected = user_rows(table)
    assert rows.empty
    reasons = rejected["reason"].tolist()
    assert "points outside the data folder" in reasons[0] and reasons[1].startswith("unreadable: missing.cif")


def test_missing_column_is_a_clear_error(table_file):
    with pytest.raises(ValueError, match="no column 'gap_ev'.*columns are"):
        user_rows(table_file, ColumnMap(cif="structure_cif", band_gap="gap_ev"))


def test_finetune_lowers_validation_loss_and_the_model_reloads_and_generates(table_file, base_model_dir, tmp_path):
    torch.manual_seed(0)
    settings = FineTuneSettings(minutes=5, epochs=4, learning_rate=3e-3, batch_size=8, evals_per_epoch=1,
                                patience=10, device="cpu")
    result = finetune(table_file, tmp_path / "ft", base_model_dir, COLUMNS, settings=settings)
    assert result.val_loss_after < result.val_loss_before
    assert result.data["rows_kept"] == 50 and result.data["rows_val"] > 0
    assert result.data["rejected_by_reason"] == {"conversion failed": 1, "out-of-range property": 1,
                                                 "not a number": 1}
    metadata = json.loads((result.model_dir / "metadata.json").read_text())
    assert metadata["fine_tune"]["base_model"]["name"] == "tiny-test-model"
    card = (result.model_dir / "MODEL_CARD.md").read_text()
    assert "weights SHA-256" in card and "structure_cif" not in card and "data_" not in card
    loaded = load_model(result.model_dir, dtype=torch.float32)
    run = generate(loaded, GenerationRequest(band_gap=1.0, e_hull=0.0, n=2, seed=0,
                                             settings=SamplingSettings(decoding="free")))
    assert len(run.candidates) == 2


def test_cancel_writes_nothing(table_file, base_model_dir, tmp_path):
    out = tmp_path / "ft"
    assert finetune(table_file, out, base_model_dir, COLUMNS, should_stop=lambda: True) is None
    assert not out.exists() or not any(out.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # work folder removed


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "invalid fine-tuning settings: epochs"),
    (["--band-gap-column", "nope"], "no column 'nope'"),
    (["--device", "tpu"], "device must be auto, cpu or cuda"),
])
def test_cli_bad_input_is_one_line_and_exit_2(table_file, base_model_dir, tmp_path, capsys, extra, message):
    code = main(["finetune", str(table_file), "--out", str(tmp_path / "o"), "--from", str(base_model_dir),
                 "--cif-column", "structure_cif", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_reports_rejections_and_writes_a_model(table_file, base_model_dir, tmp_path, capsys):
    code = main(["finetune", str(table_file), "--out", str(tmp_path / "m"), "--from", str(base_model_dir),
                 "--cif-column", "structure_cif", "--band-gap-column", "gap", "--e-hull-column", "ehull",
                 "--id-column", "name", "--epochs", "1", "--minutes", "2", "--learning-rate", "3e-3", "--device", "cpu"])
    printed = capsys.readouterr()
    out = printed.out
    assert code == 0, out
    assert "converting CIFs: 100%" in printed.err and "fine-tuning" in printed.err and "loss" in printed.err
    assert "53 rows: 50 kept" in out and "rejected 1: out-of-range property" in out and "hot: out-of-range" in out
    assert "validation loss" in out and (tmp_path / "m" / "config.json").is_file()
    assert main(["finetune", str(table_file), "--out", str(tmp_path / "m"), "--from", str(base_model_dir)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_cli_missing_data_file(tmp_path, capsys):
    assert main(["finetune", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
