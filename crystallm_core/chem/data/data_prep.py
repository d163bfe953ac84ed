"""`python -m crystallm_core prepare-data`: raw shared data → training table, splits, token cache.

Sources (see the data README), in order of trust; a later source never overrides an earlier one:
  mp20    MP-20 biternary + pilot: band gap, E_hull and formation energy
  mpts52  MPTS-52: E_hull and formation energy; band gap only where the labels parquet has it
  wbm     WBM hypothetical structures: band gap and formation energy; E_hull computed against
          the hull of the MP phases (crystallm_core.chem.data.hull), so it can be negative (below the
          MP-20 hull) and is biased low
  extra   LeMaterial's sample of MP, Alexandria, OQMD and JARVIS (extra/lemat_genbench_baseline):
          no labels, trained as "both properties unknown" (the unconditional path); cells too
          long for the context are dropped like any other
  align   (with --align-runs) the judged samples of reward fine-tuning runs, labelled with the
          readings they reached (CHGNet E_hull, the gap head's gap); train-split formulas only
Duplicates are dropped by id and by a cheap structure key (reduced formula, space group, volume
per atom to 0.1 Å³), keeping the earlier source. Splits come from `splits.split_of` (by reduced
formula). Every structure becomes the model's CIF (`cif_format`) and token ids; a structure
that fails is counted with its reason, never fatal. Sequences over 1024 tokens or holding
unknown tokens are dropped, as in CrystaLLM-pi.

Outputs in --out (default cache_dir()); rows of dataset.parquet and tokens.npz are aligned:
  dataset.parquet  id, source, reduced_formula, formula, spacegroup_number, n_atoms, band_gap,
                   e_hull, e_form, split, cif (original), n_tokens; NaN = unknown, raw values
  splits.csv       id, reduced_formula, split
  tokens.npz       tokens (uint16, all sequences with <bos>/<eos>), offsets (int64, N+1),
                   conditions (float32 N×2, normalised; 0.0 where missing), present (bool N×2),
                   split (int8: 0 train, 1 val, 2 test), ids (str) — all training needs
  rejected.csv     id, source, reason of every structure that was dropped
  summary.json     the printed summary
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm import tqdm
from pymatgen.core import Structure

from crystallm_core.chem.cif.cif_format import structure_to_model_cif, training_text
from crystallm_core.chem.data.hull import HullReference
from crystallm_core.chem.data.splits import DEFAULT_SEED, split_of
from crystallm_core.lm.conditions import (
    BAND_GAP_MAX,
    E_HULL_MAX,
    normalise_band_gap,
    normalise_e_hull,
)
from crystallm_core.lm.tokenizer import get_tokenizer
from crystallm_core.paths import cache_dir, data_dir

SOURCES = ("mp20", "mpts52", "wbm", "extra", "align")
OPTIONAL_SOURCES = ("extra", "align")
RELABELLED_FILE = "relabelled.csv.gz"  # what each `align` round writes: its judged samples with their readings
EXTRA_FILE = "extra/lemat_genbench_baseline.csv.gz"
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
LABELS_FILE = "labels/mp20_hulls_mace_above_hull_dataset.parquet"
SPACEGROUP_RE = re.compile(r"_symmetry_Int_Tables_number \[?(\d+)")
ROW_COLUMNS = ["id", "source", "cif", "band_gap", "e_hull", "e_form"]


@dataclass
class PrepConfig:
    data_dir: Path
    out: Path
    limit: int | None = None  # at most this many rows per source (a seeded random sample)
    seed: int = DEFAULT_SEED  # split seed; also seeds the --limit sample
    workers: int = 2
    max_tokens: int = 1024
    volume_decimals: int = 1  # Å³/atom rounding of the duplicate key
    align_runs: tuple[Path, ...] = ()  # reward fine-tuning runs whose relabelled samples join (train split only)


# ---- reading the raw sources ---------------------------------------------------------------
def read_csvs(folder: Path) -> pd.DataFrame:
    files = sorted(folder.glob("*.csv.gz"))
    if not files:
        raise ValueError(f"no *.csv.gz files in {folder}")
    return pd.concat([pd.read_csv(f) for f in files], ignore_index=True)


def relabelled_rows(runs: tuple[Path, ...]) -> pd.DataFrame:
    """The judged samples of `align` runs (each round's RELABELLED_FILE), labelled with the
    readings they reached (CHGNet E_hull, the gap head's gap), train-split formulas only: the
    validation and test splits stay real Materials Project structures."""
    files = [f for run in runs for f in sorted(Path(run).glob(f"round_*/{RELABELLED_FILE}"))]
    if not files:
        return pd.DataFrame(columns=ROW_COLUMNS)
    table = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    table = table[[split_of(str(formula)) == "train" for formula in table["formula"]]]
    return pd.DataFrame({"id": "align-" + table["id"].astype(str), "source": "align", "cif": table["cif"],
                         "band_gap": table["band_gap"], "e_hull": table["e_hull"], "e_form": table["e_form"]})


def load_sources(data_dir: Path, align_runs: tuple[Path, ...] = ()) -> pd.DataFrame:
    """All raw rows as one table (ROW_COLUMNS), duplicate ids removed (earlier source wins)."""
    mp20 = read_csvs(data_dir / "mp20")
    mp20 = pd.DataFrame({"id": mp20["material_id"], "source": "mp20", "cif": mp20["cif"],
                         "band_gap": mp20["band_gap"], "e_hull": mp20["e_above_hull"],
                         "e_form": mp20["formation_energy_per_atom"]})
    labels = pd.read_parquet(data_dir / LABELS_FILE, columns=["material_id", "band_gap"])
    gap_by_id = labels.drop_duplicates("material_id").set_index("material_id")["band_gap"]
    mpts = read_csvs(data_dir / "mpts52")
    mpts = pd.DataFrame({"id": mpts["material_id"], "source": "mpts52", "cif": mpts["cif"],
                         "band_gap": mpts["material_id"].map(gap_by_id), "e_hull": mpts["energy_above_hull"],
                         "e_form": mpts["formation_energy_per_atom"]})
    wbm = read_csvs(data_dir / "wbm")
    wbm = pd.DataFrame({"id": "wbm-" + wbm["wbm_row"].astype(str), "source": "wbm", "cif": wbm["cif"],
                        "band_gap": wbm["band_gap"], "e_hull": np.nan,
                        "e_form": wbm["formation_energy_per_atom"]})
    parts = [mp20, mpts, wbm]
    if (data_dir / EXTRA_FILE).is_file():
        extra = pd.read_csv(data_dir / EXTRA_FILE)
        parts.append(pd.DataFrame({"id": "extra-" + extra["source"].astype(str) + "-" + extra["id"].astype(str),
                                   "source": "extra", "cif": extra["cif"], "band_gap": np.nan, "e_hull": np.nan,
                                   "e_form": np.nan}))
    if align_runs:
        parts.append(relabelled_rows(align_runs))
    rows = pd.concat(parts, ignore_index=True)
    return rows.drop_duplicates("id", keep="first").reset_index(drop=True)


def sample_per_source(rows: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    parts = [part.sample(min(limit, len(part)), random_state=seed) for _, part in rows.groupby("source", sort=False)]
    return pd.concat(parts).sort_index()


# ---- one structure (runs in the worker processes) ------------------------------------------
class RowProcessor:
    """CIF → properties, model CIF and token ids of one row; errors become a reason string."""

    def __init__(self, hull: HullReference | None, max_tokens: int):
        self.hull = hull
        self.max_tokens = max_tokens
        self.tokenizer = get_tokenizer()  # built before forking, so every worker inherits it

    def __call__(self, row: dict) -> dict:
        result = {"id": row["id"], "reason": None}
        try:
            with warnings.catch_warnings():  # pymatgen's CIF-parser chatter would flood the log
                warnings.simplefilter("ignore")
                structure = Structure.from_str(row["cif"], fmt="cif")
                model_cif = structure_to_model_cif(structure)
        except Exception as err:  # any failure of one structure is a reason, not a crash
            result["reason"] = f"conversion failed: {type(err).__name__}: {err}"[:300]
            return result
        composition = structure.composition
        match = SPACEGROUP_RE.search(model_cif)
        result.update(reduced_formula=composition.reduced_formula, formula=composition.formula.replace(" ", ""),
                      n_atoms=len(structure), volume_per_atom=structure.volume / len(structure),
                      spacegroup_number=int(match.group(1)) if match else 1, e_hull=row["e_hull"])
        if pd.isna(row["e_hull"]) and pd.notna(row["e_form"]) and self.hull is not None:
            try:
                result["e_hull"] = self.hull.e_above_hull(composition, row["e_form"])
            except ValueError as err:  # e.g. an element without a reference state
                result["e_hull_error"] = str(err)
        ids, unknown = self.tokenizer.encode_with_report(training_text(model_cif))
        foreign = sorted({e.symbol for e in composition} - set(self.tokenizer.token_to_id))
        if foreign:
            result["reason"] = f"unknown element: {', '.join(foreign)} (not in the model's vocabulary)"
        elif unknown:
            result["reason"] = f"unknown tokens: {sorted(set(unknown))[:5]}"
        elif len(ids) > self.max_tokens:
            result["reason"] = f"too long: {len(ids)} tokens"
        result["tokens"] = np.asarray(ids, dtype=np.uint16)
        return result


WORKER_PROCESSOR: RowProcessor | None = None  # set in each pool worker by its initializer


def set_worker_processor(processor: RowProcessor) -> None:
    global WORKER_PROCESSOR
    WORKER_PROCESSOR = processor


def process_in_worker(row: dict) -> dict:
    return WORKER_PROCESSOR(row)


@contextmanager
def row_mapper(processor: RowProcessor, workers: int):
    """Yield a function mapping row dicts to results, in a fork pool when workers > 1."""
    if workers == 1:
        yield lambda records: map(processor, records)
        return
    # fork: the workers inherit the processor (hull, caches) instead of unpickling it
    pool = multiprocessing.get_context("fork").Pool(workers, set_worker_processor, (processor,))
    try:
        yield lambda records: pool.imap(process_in_worker, records, chunksize=8)
    finally:
        pool.terminate()


def process_rows(rows: pd.DataFrame, map_rows) -> list[dict]:
    """Convert all rows with `map_rows` (from row_mapper), with a progress bar and ETA on stderr."""
    records = rows[ROW_COLUMNS].to_dict("records")
    return list(tqdm(map_rows(records), total=len(records), desc="converting CIFs", unit="row", mininterval=1))


def convert_rows(rows: pd.DataFrame, max_tokens: int, workers: int = 1, hull: HullReference | None = None) -> list[dict]:
    """Every row (ROW_COLUMNS) through RowProcessor: the one conversion prepare-data and fine-tuning share."""
    with row_mapper(RowProcessor(hull, max_tokens), workers) as map_rows:
        return process_rows(rows, map_rows)


# ---- assembling the table ------------------------------------------------------------------
def clipped_condition(value: float, maximum: float, normalise) -> tuple[float, bool]:
    """Normalised value and present flag; out-of-range values are clipped (raw kept elsewhere)."""
    if pd.isna(value):
        return 0.0, False
    return normalise(min(max(float(value), 0.0), maximum)), True


def build_dataset(rows: pd.DataFrame, results: list[dict], config: PrepConfig,
                  assign_splits: Callable[[pd.Series], list[str]] | None = None) -> tuple[pd.DataFrame, list, pd.DataFrame]:
    """(kept table, their token arrays, rejected rows with reasons). `assign_splits` maps the kept
    rows' reduced formulas to split names (default: `split_of` with the config's seed)."""
    by_id = {r["id"]: r for r in results}
    table = rows.copy()
    table["reason"] = [by_id[i]["reason"] for i in table["id"]]
    for column in ["reduced_formula", "formula", "n_atoms", "volume_per_atom", "spacegroup_number", "e_hull",
                   "e_hull_error"]:
        table[column] = [by_id[i].get(column, np.nan) for i in table["id"]]
    # The same structure from two sources: keep the first (rows are in source order, MP first).
    converted = table["reduced_formula"].notna()
    parsed = table[converted]
    key = [parsed["reduced_formula"], parsed["spacegroup_number"], parsed["volume_per_atom"].round(config.volume_decimals)]
    first_source = parsed.groupby(key)["source"].transform("first")
    table.loc[first_source.index[parsed["source"] != first_source], "reason"] = "duplicate structure of an earlier source"
    rejected = table.loc[table["reason"].notna(), ["id", "source", "reason"]]
    kept = table[table["reason"].isna()].reset_index(drop=True)
    kept["split"] = (assign_splits(kept["reduced_formula"]) if assign_splits is not None
                     else [split_of(f, seed=config.seed) for f in kept["reduced_formula"]])
    splits_per_formula = kept.groupby("reduced_formula")["split"].nunique()
    if (splits_per_formula > 1).any():  # cannot happen with split_of, but the guarantee matters
        raise RuntimeError(f"formulas in several splits: {list(splits_per_formula[splits_per_formula > 1].index[:5])}")
    tokens = [by_id[i]["tokens"] for i in kept["id"]]
    kept["n_tokens"] = [len(t) for t in tokens]
    kept["n_atoms"] = kept["n_atoms"].astype(int)
    kept["spacegroup_number"] = kept["spacegroup_number"].astype(int)
    return kept, tokens, rejected


def token_arrays(kept: pd.DataFrame, tokens: list) -> dict[str, np.ndarray]:
    """The arrays of tokens.npz (see module docstring)."""
    gap = [clipped_condition(v, BAND_GAP_MAX, normalise_band_gap) for v in kept["band_gap"]]
    hull = [clipped_condition(v, E_HULL_MAX, normalise_e_hull) for v in kept["e_hull"]]
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    return {
        "tokens": np.concatenate(tokens).astype(np.uint16) if tokens else np.zeros(0, np.uint16),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "conditions": np.array([[g[0], h[0]] for g, h in zip(gap, hull)], dtype=np.float32).reshape(-1, 2),
        "present": np.array([[g[1], h[1]] for g, h in zip(gap, hull)], dtype=bool).reshape(-1, 2),
        "split": kept["split"].map(SPLIT_CODES).to_numpy(dtype=np.int8),
        "ids": kept["id"].to_numpy(dtype=str),
    }


def reason_kinds(reasons: pd.Series) -> pd.Series:
    """A reason's kind: its text before the details ("too long: 1100 tokens" → "too long")."""
    return reasons.str.replace(r"(: |\s\d).*", "", regex=True)


def property_ranges(kept: pd.DataFrame, columns: list[str]) -> dict:
    """min / median / max and the number missing, per property column."""
    ranges = {}
    for column in columns:
        values = kept[column].dropna()
        ranges[column] = {"min": float(values.min()) if len(values) else None,
                          "median": float(values.median()) if len(values) else None,
                          "max": float(values.max()) if len(values) else None,
                          "missing": int(kept[column].isna().sum())}
    return ranges


def summarise(rows: pd.DataFrame, kept: pd.DataFrame, rejected: pd.DataFrame, seconds: float) -> dict:
    """Counts, token-length percentiles, property ranges and missing-property counts."""
    reasons = reason_kinds(rejected["reason"])
    properties = property_ranges(kept, ["band_gap", "e_hull", "e_form"])
    for column, entry in properties.items():
        entry["missing_by_source"] = kept[column].isna().groupby(kept["source"]).sum().astype(int).to_dict()
    return {
        "seconds": round(seconds, 1),
        "rows_in_by_source": rows["source"].value_counts().to_dict(),
        "rows_kept_by_source": kept["source"].value_counts().to_dict(),
        "rows_by_split": kept["split"].value_counts().to_dict(),
        "rows_by_source_and_split": {f"{s}/{p}": int(n) for (s, p), n in kept.groupby(["source", "split"]).size().items()},
        "formulas_by_split": kept.groupby("split")["reduced_formula"].nunique().to_dict(),
        "rejected_by_reason": reasons.value_counts().to_dict(),
        "rejected_by_source_and_reason": {f"{s}: {r}": int(n) for (s, r), n in
                                          pd.DataFrame({"s": rejected["source"], "r": reasons}).value_counts().items()},
        "token_length_percentiles": {str(p): int(np.percentile(kept["n_tokens"], p)) for p in (0, 5, 25, 50, 75, 95, 99, 100)}
        if len(kept) else {},
        "properties": properties,
        "e_hull_below_zero": int((kept["e_hull"] < 0).sum()),
        "e_hull_not_computable": int(kept["e_hull_error"].notna().sum()),
        "e_hull_above_max_clipped": int((kept["e_hull"] > E_HULL_MAX).sum()),
        "band_gap_above_max_clipped": int((kept["band_gap"] > BAND_GAP_MAX).sum()),
    }


def write_outputs(rows: pd.DataFrame, results: list[dict], config: PrepConfig, seconds: float,
                  sources_done: list[str]) -> dict:
    """Assemble and write every output file (each replaced atomically); return the summary."""
    kept, tokens, rejected = build_dataset(rows, results, config)
    config.out.mkdir(parents=True, exist_ok=True)
    columns = ["id", "source", "reduced_formula", "formula", "spacegroup_number", "n_atoms", "band_gap",
               "e_hull", "e_form", "split", "cif", "n_tokens"]
    summary = {"sources_done": sources_done, **summarise(rows, kept, rejected, seconds)}
    writers = {
        "dataset.parquet": lambda f: kept[columns].to_parquet(f, index=False),
        "splits.csv": lambda f: kept[["id", "reduced_formula", "split"]].to_csv(f, index=False),
        "tokens.npz": lambda f: np.savez(f, **token_arrays(kept, tokens)),
        "rejected.csv": lambda f: rejected.to_csv(f, index=False),
        "summary.json": lambda f: f.write(json.dumps(summary, indent=2).encode()),
    }
    for name, write in writers.items():
        partial = config.out / f".{name}.partial"
        with open(partial, "wb") as handle:
            write(handle)
        partial.replace(config.out / name)  # a reader never sees a half-written file
    return summary


def prepare(config: PrepConfig) -> dict:
    """The whole pipeline; returns the summary.

    Sources are converted one after another and the outputs rewritten after each: an earlier
    source never loses rows to a later one, so the early files are an exact subset of the
    final ones (summary.json lists `sources_done`), and training can start on MP-20 early.
    """
    start = time.time()
    if not (config.data_dir / "mp20").is_dir():
        raise ValueError(f"data directory {config.data_dir} has no mp20/ folder (use --data-dir)")
    rows = load_sources(config.data_dir, config.align_runs)
    if config.limit:
        rows = sample_per_source(rows, config.limit, config.seed)
    print(f"read {len(rows)} rows: {rows['source'].value_counts().to_dict()}", flush=True)
    hull = HullReference.from_data_dir(config.data_dir, vertices_only=False)
    print(f"hull reference: {len(hull.table)} phases ({time.time() - start:.0f} s)", flush=True)
    results: list[dict] = []
    with row_mapper(RowProcessor(hull, config.max_tokens), config.workers) as map_rows:
        present = [source for source in SOURCES if (rows["source"] == source).any() or source not in OPTIONAL_SOURCES]
        for n, source in enumerate(present, 1):
            print(f"{source}: converting {(rows['source'] == source).sum()} rows", flush=True)
            results += process_rows(rows[rows["source"] == source], map_rows)
            done = rows[rows["source"].isin(present[:n])]
            summary = write_outputs(done, results, config, time.time() - start, present[:n])
            print(f"wrote outputs for {', '.join(present[:n])}: {sum(summary['rows_kept_by_source'].values())} rows "
                  f"({time.time() - start:.0f} s)", flush=True)
    return summary


# ---- command line --------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None, help="raw shared data (default: data_dir())")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: cache_dir())")
    parser.add_argument("--limit", type=int, default=None, help="at most N random rows per source (quick runs)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="split seed (and --limit sample seed)")
    parser.add_argument("--workers", type=int, default=2, help="conversion processes")
    parser.add_argument("--align-runs", type=Path, nargs="*", default=[],
                        help="reward fine-tuning run folders whose relabelled samples join the training split")


def run(args: argparse.Namespace) -> int:
    if args.workers < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--workers and --limit must be ≥ 1")
    config = PrepConfig(data_dir=args.data_dir or data_dir(), out=args.out or cache_dir(),
                        limit=args.limit, seed=args.seed, workers=args.workers, align_runs=tuple(args.align_runs))
    summary = prepare(config)
    print(json.dumps(summary, indent=2))
    print(f"wrote dataset.parquet, splits.csv, tokens.npz, rejected.csv, summary.json to {config.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m crystallm_core.chem.data.data_prep …` (same as `python -m crystallm_core prepare-data …`)."""
    parser = argparse.ArgumentParser(prog="python -m crystallm_core.chem.data.data_prep",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ValueError as err:
        print(f"prepare-data: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
