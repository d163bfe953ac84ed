"""What a round of `align` learns from: its judged samples turned into training examples by the
learning signals (hindsight relabelling, rejection sampling, relaxed teachers, replay of real
rows), DPO pairs, and the relabelled table for the next pre-training run.

Each signal teaches a (formula, space group) once per run, and rejection sampling a prototype
(anonymous formula, space group) once per run (`taught`, kept in the run's state).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Composition

from crystallm_core.chem.cif.cif_format import structure_to_model_cif, training_text
from crystallm_core.chem.data.data_prep import RowProcessor, load_sources
from crystallm_core.chem.data.splits import split_of
from crystallm_core.chem.judges.reward import reached_targets
from crystallm_core.lm.conditions import condition_vector
from crystallm_core.lm.preference import PreferencePair
from crystallm_core.paths import data_dir
from crystallm_core.product.align_settings import AlignSettings


@dataclass
class Example:
    """One training sequence with the targets it teaches (None = unknown) and where it came from."""

    tokens: np.ndarray
    band_gap: float | None
    e_hull: float | None
    signal: str


def known(value) -> float | None:
    """A table cell as a target: None where it is missing ("unknown")."""
    return None if pd.isna(value) else float(value)


def encode_structure(tokenizer, structure, max_tokens: int) -> np.ndarray | None:
    """The canonical training text of a structure as token ids (None if it does not fit)."""
    try:
        ids = tokenizer.encode(training_text(structure_to_model_cif(structure)))
    except Exception:  # a structure the format cannot hold: not an example
        return None
    return np.asarray(ids, dtype=np.int64) if len(ids) <= max_tokens else None


def structure_kind(row: pd.Series) -> str:
    """(reduced formula, space group) of a judged sample, as one string (kept in the run's state)."""
    return f"{row.get('formula')}|{row.get('space_group')}"


def prototype(formula, space_group) -> str | None:
    """A structure's prototype: anonymous formula (ABC3) and space group; None without a formula."""
    try:
        return f"{Composition(str(formula)).anonymized_formula}|{space_group}"
    except Exception:  # no formula: an invalid sample
        return None


def prototypes(frame: pd.DataFrame) -> pd.Series:
    """Each valid sample's prototype (None for an invalid one)."""
    return pd.Series([prototype(f, sg) if ok else None for f, sg, ok in
                      zip(frame["formula"], frame["space_group"], frame["valid"].astype(bool))], index=frame.index)


def usable_rows(frame: pd.DataFrame) -> pd.Series:
    """Valid samples, first of their kind within the round: the ones worth learning from."""
    return frame["valid"].astype(bool) & frame["unique"].fillna(False).astype(bool)


def encoded_samples(frame: pd.DataFrame, candidates, tokenizer, max_tokens: int) -> dict[int, np.ndarray | None]:
    """Canonical token ids of each usable sample (None where it does not fit the context)."""
    return {i: encode_structure(tokenizer, candidates[i].structure, max_tokens) for i in frame.index[usable_rows(frame)]}


def relaxed_kind(structure) -> str:
    """(reduced formula, space group) of a relaxed structure, as `structure_kind` writes it."""
    try:
        symbol = structure.get_space_group_info(symprec=0.1)[0]
    except Exception:  # spglib gave up: the formula alone
        symbol = "?"
    return f"{structure.composition.reduced_formula}|{symbol}"


def round_examples(frame: pd.DataFrame, tokens: dict[int, np.ndarray | None], relaxed: list[dict], tokenizer,
                   settings: AlignSettings, max_tokens: int, taught: set[str] | None = None) -> list[Example]:
    """The round's judged samples as training examples, by the signals switched on. Each signal
    teaches a (formula, space group) once per run, and rejection sampling, which rewards what
    the judges like, a prototype once per run: `taught` holds what earlier rounds taught and
    gains this round's. Teaching the model the same structure round after round is how
    self-training collapses onto a few easy families (a first run's uniqueness fell from 100 %
    to 83 % in five rounds, onto A2BF6 fluorides: many formulas, one prototype)."""
    taught = set() if taught is None else taught

    def first_time(signal: str, kind: str) -> bool:
        key = f"{signal}:{kind}"
        new = key not in taught
        taught.add(key)
        return new

    signals, examples = settings.signals, []
    usable = usable_rows(frame)
    if signals.hindsight:
        for i, ids in tokens.items():
            gap, hull = reached_targets(frame.loc[i].to_dict())
            known_target = gap is not None or hull is not None
            if ids is not None and known_target and first_time("hindsight", structure_kind(frame.loc[i])):
                examples.append(Example(ids, gap, hull, "hindsight"))
    if signals.rejection:
        for _, cell in frame[usable].groupby(["band_gap_target", "e_hull_target"], dropna=False):
            keep = max(1, int(round(settings.keep_best * len(cell))))
            for i in cell.sort_values("reward", ascending=False).index[:keep]:
                good = frame.at[i, "reward"] >= settings.min_reward and tokens[i] is not None
                kind = prototype(frame.at[i, "formula"], frame.at[i, "space_group"])
                if good and first_time("rejection", kind):
                    examples.append(Example(tokens[i], known(frame.at[i, "band_gap_target"]),
                                            known(frame.at[i, "e_hull_target"]), "rejection"))
    if signals.relaxed_teachers:
        for result in relaxed:
            if result.get("valid"):
                ids = encode_structure(tokenizer, result["structure"], max_tokens)
                gap, hull = reached_targets(result)
                if ids is not None and hull is not None and first_time("relaxed", relaxed_kind(result["structure"])):
                    examples.append(Example(ids, gap, hull, "relaxed"))
    return examples


def relabelled_table(frame: pd.DataFrame, candidates, relaxed: list[dict], prefix: str) -> pd.DataFrame:
    """The round's usable samples and valid relaxed structures as CIFs with the readings they
    reached, for the next pre-training run (`prepare-data --align-runs`)."""
    rows = []
    for i in frame.index[usable_rows(frame)]:
        gap, hull = reached_targets(frame.loc[i].to_dict())
        rows.append({"id": f"{prefix}-{i}", "formula": frame.at[i, "formula"], "cif": candidates[i].cif,
                     "band_gap": gap, "e_hull": hull, "e_form": frame.at[i, "e_form_pred"], "signal": "hindsight"})
    for result in relaxed:
        if result.get("valid"):
            gap, hull = reached_targets(result)
            rows.append({"id": f"{prefix}-{result['index']}-relaxed", "formula": frame.at[result["index"], "formula"],
                         "cif": result["structure"].to(fmt="cif"), "band_gap": gap, "e_hull": hull,
                         "e_form": result.get("e_form_pred"), "signal": "relaxed"})
    return pd.DataFrame(rows, columns=["id", "formula", "cif", "band_gap", "e_hull", "e_form", "signal"])


def preference_pairs(frame: pd.DataFrame, tokens: dict[int, np.ndarray | None],
                     settings: AlignSettings) -> list[PreferencePair]:
    """Per target cell (one prompt), the i-th best usable sample against the i-th worst, for
    pairs whose rewards differ by at least `min_reward_gap`, conditioned on the cell's targets."""
    pairs = []
    for _, cell in frame[usable_rows(frame)].groupby(["band_gap_target", "e_hull_target"], dropna=False):
        ranked = [i for i in cell.sort_values("reward", ascending=False).index if tokens.get(i) is not None]
        vector, present = condition_vector(known(cell["band_gap_target"].iloc[0]), known(cell["e_hull_target"].iloc[0]))
        for k in range(min(settings.pairs_per_cell, len(ranked) // 2)):
            best, worst = ranked[k], ranked[-1 - k]
            if frame.at[best, "reward"] - frame.at[worst, "reward"] >= settings.min_reward_gap:
                pairs.append(PreferencePair(tokens[best], tokens[worst], np.asarray(vector, np.float32),
                                            np.asarray(present, bool)))
    return pairs


def replay_pool(size: int, max_tokens: int, seed: int, source: Path | None = None) -> list[Example]:
    """`size` labelled train-split rows of MP-20 as examples (empty when the data is absent)."""
    folder = Path(source) if source else data_dir()
    if size < 1 or not (folder / "mp20").is_dir():
        return []
    rows = load_sources(folder)
    rows = rows[(rows["source"] == "mp20") & rows["band_gap"].notna()].sample(frac=1.0, random_state=seed)
    process = RowProcessor(None, max_tokens)
    pool = []
    for row in rows.head(3 * size).to_dict("records"):
        result = process(row)
        if result["reason"] is None and split_of(result["reduced_formula"]) == "train":
            pool.append(Example(result["tokens"].astype(np.int64), float(row["band_gap"]), float(row["e_hull"]), "replay"))
        if len(pool) == size:
            break
    return pool
