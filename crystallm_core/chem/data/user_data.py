"""A user's own structures as prepare-data rows: a table (CSV / Parquet) with a CIF column or a
column of CIF file paths, or a folder of CIF files with an optional labels table.

Properties are optional: an empty cell (or no column) is "unknown" for that row, as in
training. A row whose property is not a number or lies outside the model's range, whose CIF is
missing or far too long, or whose id repeats, is rejected here with its reason; the rest go
through `data_prep.convert_rows` like the project's own data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from crystallm_core.chem.data.data_prep import ROW_COLUMNS
from crystallm_core.lm.conditions import BAND_GAP_MAX, E_HULL_MAX

TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet")
MAX_CIF_CHARS = 100_000  # far above any CIF of ≤ 1024 tokens; spares the parser hostile files
SOURCE = "user"
PROPERTY_LIMITS = {"band_gap": (BAND_GAP_MAX, "eV"), "e_hull": (E_HULL_MAX, "eV/atom")}


@dataclass
class ColumnMap:
    """Which column holds what; None = the default name when the table has it."""

    cif: str | None = None  # CIF text (default "cif")
    path: str | None = None  # CIF file paths, relative to the table's folder (default "path")
    band_gap: str | None = None  # eV (default "band_gap")
    e_hull: str | None = None  # eV/atom (default "e_hull")
    id: str | None = None  # row ids (default "id", else the row number; in a labels table the file name)


def is_table(path: Path) -> bool:
    return path.name.lower().endswith(TABLE_SUFFIXES)


def read_table(path: Path) -> pd.DataFrame:
    """A CSV (optionally gzipped) or Parquet file; ValueError with the reason otherwise."""
    if not is_table(path):
        raise ValueError(f"{path.name}: expected a .csv, .csv.gz or .parquet file, or a folder of .cif files")
    try:
        table = pd.read_parquet(path) if path.name.lower().endswith(".parquet") else pd.read_csv(path)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except Exception as error:  # pandas/pyarrow raise many types for malformed files
        raise ValueError(f"cannot read {path.name} as a table: {type(error).__name__}: {error}"[:300]) from None
    if table.empty:
        raise ValueError(f"{path.name} has no rows")
    table.columns = [str(c) for c in table.columns]
    return table


def table_columns(path: Path) -> list[str]:
    """Column names of a table, or of a folder's labels (none for a bare folder)."""
    return [] if path.is_dir() else list(read_table(path).columns)


def pick(table: pd.DataFrame, chosen: str | None, default: str, what: str) -> str | None:
    """The column to use for `what`: the chosen one (which must exist) or the default if present."""
    if chosen:
        if chosen not in table.columns:
            raise ValueError(f"no column '{chosen}' for {what}; the columns are: {', '.join(table.columns)}")
        return chosen
    return default if default in table.columns else None


def read_cif_file(path: Path, folder: Path) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason); the file must lie inside `folder`."""
    resolved = (folder / path).resolve()
    if not resolved.is_relative_to(folder.resolve()):
        return None, f"unreadable: {path} points outside the data folder"
    try:
        if resolved.stat().st_size > MAX_CIF_CHARS:
            return None, f"too long: file of {resolved.stat().st_size} bytes"
        return resolved.read_text(errors="replace"), None
    except OSError as error:
        return None, f"unreadable: {path}: {error.strerror or error}"


def property_values(table: pd.DataFrame, column: str | None, name: str) -> tuple[pd.Series, pd.Series]:
    """(values with NaN = unknown, reason per row or None) for one property column."""
    if column is None:
        return pd.Series(np.nan, index=table.index), pd.Series(None, index=table.index, dtype=object)
    raw = table[column]
    values = pd.to_numeric(raw, errors="coerce")
    maximum, unit = PROPERTY_LIMITS[name]
    reasons = pd.Series(None, index=table.index, dtype=object)
    not_number = values.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
    reasons[not_number] = [f"not a number: {name} {str(v)[:30]!r}" for v in raw[not_number]]
    outside = values.notna() & ((values < 0) | (values > maximum) | ~np.isfinite(values))
    reasons[outside] = [f"out-of-range property: {name} {v:g} {unit} (allowed 0 to {maximum:g})" for v in values[outside]]
    return values.where(reasons.isna()), reasons


def rows_from_table(table: pd.DataFrame, columns: ColumnMap, folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows in ROW_COLUMNS, rejected id/source/reason) from a table with CIF text or paths."""
    cif_column = pick(table, columns.cif, "cif", "CIF text")
    path_column = None if cif_column else pick(table, columns.path, "path", "CIF file paths")
    if cif_column is None and path_column is None:
        raise ValueError(f"no CIF column: name the column with CIF text (--cif-column) or with CIF file paths "
                         f"(--path-column); the columns are: {', '.join(table.columns)}")
    id_column = pick(table, columns.id, "id", "row ids")
    ids = table[id_column].astype(str) if id_column else pd.Series([f"row {i + 1}" for i in range(len(table))],
                                                                    index=table.index)
    reasons = pd.Series(None, index=table.index, dtype=object)
    reasons[ids.duplicated()] = "duplicate id"
    if cif_column:
        cifs = table[cif_column].where(table[cif_column].notna(), "").astype(str)
    else:
        read = [read_cif_file(Path(str(p)), folder) if pd.notna(p) else (None, "unreadable: no path")
                for p in table[path_column]]
        cifs = pd.Series([text or "" for text, _ in read], index=table.index)
        reasons = reasons.fillna(pd.Series([reason for _, reason in read], index=table.index, dtype=object))
    reasons[reasons.isna() & (cifs.str.strip() == "")] = "unparseable: empty CIF"
    reasons[reasons.isna() & (cifs.str.len() > MAX_CIF_CHARS)] = "too long: CIF over 100,000 characters"
    properties = {}
    for name, chosen in (("band_gap", columns.band_gap), ("e_hull", columns.e_hull)):
        values, problems = property_values(table, pick(table, chosen, name, name), name)
        properties[name] = values
        reasons = reasons.fillna(problems)
    rows = pd.DataFrame({"id": ids, "source": SOURCE, "cif": cifs, **properties, "e_form": np.nan})[ROW_COLUMNS]
    rejected = pd.DataFrame({"id": ids, "source": SOURCE, "reason": reasons})
    return rows[reasons.isna()].reset_index(drop=True), rejected[reasons.notna()].reset_index(drop=True)


def folder_table(folder: Path, labels: Path | None, columns: ColumnMap) -> tuple[pd.DataFrame, ColumnMap]:
    """A folder of .cif files as a table of paths, joined with the labels table by file name."""
    files = sorted(p.relative_to(folder) for p in folder.rglob("*.cif") if p.is_file())
    if not files:
        raise ValueError(f"{folder} holds no .cif files")
    table = pd.DataFrame({"path": [str(p) for p in files], "id": [str(p) for p in files]})
    if labels is None:
        return table, ColumnMap(path="path", id="id")
    label_table = read_table(labels)
    key = pick(label_table, columns.id, "id", "the file names")
    if key is None:
        raise ValueError(f"the labels table needs a column of file names (--id-column); it has: "
                         f"{', '.join(label_table.columns)}")
    names = label_table[key].astype(str).str.removesuffix(".cif")
    label_table = label_table.assign(_key=names).drop_duplicates("_key").drop(columns=["path", "id"], errors="ignore")
    table = table.assign(_key=table["path"].str.removesuffix(".cif")).merge(label_table, on="_key", how="left")
    return table, ColumnMap(path="path", id="id", band_gap=columns.band_gap, e_hull=columns.e_hull)


def user_rows(source: Path, columns: ColumnMap | None = None,
              labels: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows ready for `convert_rows`, rejected rows with reasons) from a table or a folder of CIFs."""
    columns = columns or ColumnMap()
    if source.is_dir():
        table, columns = folder_table(source, labels, columns)
        return rows_from_table(table, columns, source)
    if labels is not None:
        raise ValueError("a labels table goes with a folder of CIF files; a table holds its own properties")
    return rows_from_table(read_table(source), columns, source.parent)
