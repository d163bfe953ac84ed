"""`python -m crystallm_core align --out DIR`: the model learns from its own judges.

Rounds of (1) sampling with constrained decoding over a grid of targets that covers both
sliders (the paper's band gaps, E_hull 0 … 0.5, and "unknown" for each), (2) judging every
sample (validity, CHGNet E_hull, the gap head's g ± σ and P(metal), uniqueness within the
round, novelty; a CHGNet relaxation of a share of them), and (3) fine-tuning on what the
judgements teach (`AlignSignals`):
- hindsight relabelling: every valid, unique sample is an example of the targets it reached
  (its own gap and E_hull readings), which gives the encoder E_hull labels across 0–2 eV/atom
  that the training data never had;
- rejection sampling: the best samples of each target cell by `reward` (stability and closeness
  to the target gap), labelled with the targets they were asked for;
- relaxed teachers: the CHGNet-relaxed version of a sample (symmetry kept, re-checked),
  labelled with its relaxed readings: the geometry the model should have written;
- replay of real training rows, so the model does not drift from real crystals.
Each round is written to DIR/round_NNN/ (the model, the samples' readings, the report) and
DIR/state.json; a killed run resumes at the next round. When the valid∧unique∧novel rate of the
last `guard_window` rounds pooled falls more than `max_vun_drop` below the first round's (the
base model's), the run stops and the round's update is not taken (collapse guard). Rejection
sampling rewards each (formula, space group) once per run, so it cannot keep reinforcing one
structure.
Sampling seeds start at `seed` (default 1,000,000), far from the evaluation protocols' seeds.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from pymatgen.core import Composition
from tqdm import tqdm

from crystallm_core.chem.cif.cif_format import structure_to_model_cif, training_text
from crystallm_core.chem.data.data_prep import RELABELLED_FILE, RowProcessor, load_sources
from crystallm_core.chem.data.splits import split_of
from crystallm_core.chem.judges.metrics import MetricSettings, summarise
from crystallm_core.chem.judges.reward import RewardSettings, reached_targets, reward
from crystallm_core.chem.judges.scoring import StructureScorer
from crystallm_core.chem.judges.surrogates.generated_gap import spearman as rank_correlation
from crystallm_core.chem.judges.relaxation import relax_and_check_many
from crystallm_core.chem.judges.stability import RelaxSettings
from crystallm_core.lm.checkpoints import inference_dtype, load_model, load_model_weights, resolve_model_dir, save_model
from crystallm_core.lm.conditions import condition_vector
from crystallm_core.lm.packed_batch import PackedBatch
from crystallm_core.lm.preference import PreferencePair, preference_step
from crystallm_core.lm.sampler import SamplingSettings
from crystallm_core.lm.training import TrainConfig, condition_dropout, make_optimizer, training_step
from crystallm_core.paths import data_dir
from crystallm_core.product.evaluate import score_candidates
from crystallm_core.product.generation import GenerationRequest, generate

PAPER_BAND_GAPS = (0.072, 0.180, 0.681, 1.547, 2.440, 3.720, 6.776, 12.145)  # eV
E_HULL_TARGETS = (0.0, 0.1, 0.25, 0.5)  # eV/atom


@dataclass
class AlignSignals:
    """Which learning signals a round uses (each can be switched off for an ablation)."""

    hindsight: bool = True
    rejection: bool = True
    relaxed_teachers: bool = True
    replay: bool = True
    preference: bool = False  # DPO on best-vs-worst pairs of a cell against the frozen base model (`--with`)


@dataclass
class AlignSettings:
    rounds: int = 12
    minutes: float | None = None  # stop starting new rounds after this long
    cells_per_round: int = 12  # target cells (band gap × E_hull, "unknown" included) sampled each round
    samples_per_cell: int = 8
    relax_per_round: int = 8  # valid samples relaxed (a random share: an unbiased relaxed E_hull too)
    relax: RelaxSettings = field(default_factory=lambda: RelaxSettings(max_steps=60, max_seconds=20.0))
    pairs_per_cell: int = 2  # preference pairs: the i-th best against the i-th worst of a cell …
    min_reward_gap: float = 0.2  # … when their rewards differ by at least this
    dpo_beta: float = 0.1  # DPO's β: how far from the base model the preferences may pull
    keep_best: float = 0.25  # rejection sampling keeps this fraction of each cell, best reward first
    min_reward: float = 0.3  # … and only samples at least this good
    replay_per_round: int = 32
    free_samples: int = 8  # free-decoding validity, reported each round
    learning_rate: float = 5e-5
    batch_size: int = 8
    condition_dropout: float = 0.15
    temperature: float = 0.7
    max_vun_drop: float = 0.05
    guard_window: int = 2  # rounds pooled for the collapse guard
    seed: int = 1_000_000
    signals: AlignSignals = field(default_factory=AlignSignals)
    reward: RewardSettings = field(default_factory=RewardSettings)
    # A user's own target region (the Fine-tune page): the cells to cycle through instead of both
    # sliders' whole grid, the elements the sampler may write, and elements a sample must contain
    # to earn any reward (say, O for oxides).
    grid: list[tuple[float | None, float | None]] | None = None
    elements: list[str] | None = None
    required_elements: list[str] | None = None

    def validate(self) -> None:
        if self.rounds < 1 or self.cells_per_round < 1 or self.samples_per_cell < 1:
            raise ValueError("rounds, cells per round and samples per cell must be at least 1")
        if not 0 < self.learning_rate < 1 or self.batch_size < 1:
            raise ValueError("learning rate must lie in (0, 1) and the batch size be at least 1")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError("--minutes must be > 0")
        if self.grid is not None and not self.grid:
            raise ValueError("the target region holds no target")


@dataclass
class Example:
    """One training sequence with the targets it teaches (None = unknown) and where it came from."""

    tokens: np.ndarray
    band_gap: float | None
    e_hull: float | None
    signal: str


def target_cells(band_gaps=PAPER_BAND_GAPS, e_hulls=E_HULL_TARGETS) -> list[tuple[float | None, float | None]]:
    """Every (band gap, E_hull) pair, "unknown" (None) included for each slider."""
    return [(g, e) for g in (*band_gaps, None) for e in (*e_hulls, None)]


def region_grid(gap_low: float, gap_high: float, e_hull: float | None, n_gaps: int = 3) -> list[tuple[float, float | None]]:
    """A target region as cells: `n_gaps` band gaps spread over [gap_low, gap_high] at one E_hull."""
    if not 0 <= gap_low <= gap_high:
        raise ValueError(f"the band-gap range must be 0 ≤ low ≤ high, got {gap_low}–{gap_high} eV")
    gaps = np.linspace(gap_low, gap_high, n_gaps if gap_high > gap_low else 1)
    return [(round(float(g), 3), e_hull) for g in gaps]


def round_cells(settings: AlignSettings, round_index: int) -> list[tuple[float | None, float | None]]:
    """This round's cells: a seeded draw without replacement, so the rounds cycle through the grid."""
    cells = [tuple(cell) for cell in settings.grid] if settings.grid else target_cells()
    rng = np.random.default_rng([settings.seed, round_index])
    return [cells[i] for i in rng.permutation(len(cells))[: settings.cells_per_round]]


def encode_structure(tokenizer, structure, max_tokens: int) -> np.ndarray | None:
    """The canonical training text of a structure as token ids (None if it does not fit)."""
    try:
        ids = tokenizer.encode(training_text(structure_to_model_cif(structure)))
    except Exception:  # a structure the format cannot hold: not an example
        return None
    return np.asarray(ids, dtype=np.int64) if len(ids) <= max_tokens else None


# ---- one round ---------------------------------------------------------------------------
def sample_round(loaded, settings: AlignSettings, round_index: int, on_sample: Callable[[], None],
                 should_stop: Callable[[], bool] | None = None):
    """Sample every cell of the round into one run (constrained decoding, the paper's sampling);
    None when `should_stop` turns true (checked between cells and by the sampler between steps)."""
    sampling = SamplingSettings(temperature=settings.temperature, top_k=30, top_p=0.95, decoding="constrained")
    run = None
    for k, (gap, hull) in enumerate(round_cells(settings, round_index)):
        if should_stop is not None and should_stop():
            return None
        request = GenerationRequest(band_gap=gap, e_hull=hull, n=settings.samples_per_cell, settings=sampling,
                                    elements=settings.elements, seed=settings.seed + 1000 * round_index + k)
        run = generate(loaded, request, run, on_candidate=lambda _: on_sample(), should_cancel=should_stop)
    return None if should_stop is not None and should_stop() else run


def free_validity(loaded, settings: AlignSettings, round_index: int) -> float | None:
    """Share of free-decoding samples (band gap 1.5 eV, E_hull 0) valid as written."""
    if settings.free_samples < 1:
        return None
    request = GenerationRequest(band_gap=1.547, e_hull=0.0, n=settings.free_samples, seed=settings.seed + 1000 * round_index + 999,
                                settings=SamplingSettings(temperature=settings.temperature, top_k=30, top_p=0.95,
                                                          decoding="free"))
    run = generate(loaded, request)
    return run.n_valid / len(run.candidates)


def relax_share(frame: pd.DataFrame, candidates, scorer: StructureScorer, settings: AlignSettings,
                round_index: int) -> list[dict]:
    """Relax a random share of the valid samples together (`relax_and_check_many`: one CHGNet
    forward per FIRE step for the batch, symmetry kept); each result re-checked and re-scored."""
    valid = frame.index[frame["valid"].astype(bool)].tolist()
    rng = np.random.default_rng([settings.seed, round_index, 7])
    picks = [valid[i] for i in rng.permutation(len(valid))[: settings.relax_per_round]]
    if not picks:
        return []
    try:
        reports = relax_and_check_many([candidates[i].structure for i in picks], settings.relax)
    except Exception as error:  # a failed relaxation costs the relaxed teachers, never the round
        return [{"index": i, "error": f"{type(error).__name__}: {error}"} for i in picks]
    results = []
    for i, report in zip(picks, reports):
        if isinstance(report, str):
            results.append({"index": i, "error": report})
            continue
        valid_after = report.validity.valid
        readings = scorer.score([report.relaxation.structure])[0] if valid_after else {}
        results.append({"index": i, "structure": report.relaxation.structure, "valid": valid_after,
                        "e_hull_static": frame.at[i, "e_hull_pred"], **readings,
                        "error": None if valid_after else "; ".join(report.validity.failed_reasons[:2])})
    return results


def structure_kind(row: pd.Series) -> str:
    """(reduced formula, space group) of a judged sample, as one string (kept in the run's state)."""
    return f"{row.get('formula')}|{row.get('space_group')}"


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
    teaches a (formula, space group) once per run: `taught` holds what earlier rounds taught and
    gains this round's. Teaching the model the same structure round after round is how
    self-training collapses onto a few easy families (a first run's uniqueness fell from 100 %
    to 83 % in five rounds, onto A2BF6 fluorides)."""
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
            if ids is not None and (gap is not None or hull is not None) and first_time("hindsight", structure_kind(frame.loc[i])):
                examples.append(Example(ids, gap, hull, "hindsight"))
    if signals.rejection:
        for _, cell in frame[usable].groupby(["band_gap_target", "e_hull_target"], dropna=False):
            keep = max(1, int(round(settings.keep_best * len(cell))))
            for i in cell.sort_values("reward", ascending=False).index[:keep]:
                if frame.at[i, "reward"] >= settings.min_reward and tokens[i] is not None and first_time("rejection", structure_kind(frame.loc[i])):
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


def preference_round(model, reference, optimizer, pairs: list[PreferencePair], settings: AlignSettings,
                     round_index: int) -> dict:
    """DPO steps over the round's pairs in seeded order (half a batch of pairs: a full batch of rows)."""
    rng = np.random.default_rng([settings.seed, round_index, 13])
    order, per_step = rng.permutation(len(pairs)), max(1, settings.batch_size // 2)
    model.eval()
    results = [preference_step(model, reference, optimizer, [pairs[i] for i in order[start : start + per_step]],
                               settings.dpo_beta, grad_clip=1.0)
               for start in range(0, len(order), per_step)]
    return {"dpo_steps": len(results), "dpo_loss": float(np.mean([r[0] for r in results])) if results else None,
            "dpo_accuracy": float(np.mean([r[1] for r in results])) if results else None}


def fine_tune_round(model, optimizer, examples: list[Example], settings: AlignSettings, cfg: TrainConfig,
                    round_index: int) -> dict:
    """One pass over the examples in seeded order, packed batches; mean loss and step count."""
    rng = np.random.default_rng([settings.seed, round_index, 11])
    order = rng.permutation(len(examples))
    torch.manual_seed(settings.seed + round_index)
    losses = []
    model.eval()  # no dropout while learning from rewards (as TRL's trainers do): steadier updates, and
    # attention then runs in the fused SDPA kernel (dropout on attention weights forces the math path)
    for start in range(0, len(order), settings.batch_size):
        chunk = [examples[i] for i in order[start : start + settings.batch_size]]
        vectors = [condition_vector(e.band_gap, e.e_hull) for e in chunk]
        batch = PackedBatch.from_sequences([e.tokens for e in chunk], np.array([v for v, _ in vectors], np.float32),
                                           np.array([p for _, p in vectors], bool))
        losses.append(training_step(model, optimizer, condition_dropout(batch, settings.condition_dropout), cfg,
                                    torch.device("cpu")))
    return {"steps": len(losses), "loss": float(torch.stack(losses).mean()) if losses else None}


# ---- replay of real training rows ----------------------------------------------------------
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


# ---- the report ----------------------------------------------------------------------------
def known(value) -> float | None:
    """A table cell as a target: None where it is missing ("unknown")."""
    return None if pd.isna(value) else float(value)


def spearman(x, y) -> float | None:
    """Rank correlation over the rows where both are known (None with fewer than 5 or a constant x)."""
    x, y = pd.Series(x, dtype=float), pd.Series(y, dtype=float)
    keep = x.notna() & y.notna()
    if keep.sum() < 5 or x[keep].nunique() < 2:
        return None
    return rank_correlation(x[keep].to_numpy(), y[keep].to_numpy())


def median_or_none(values) -> float | None:
    values = pd.Series(values, dtype=float).dropna()
    return float(values.median()) if len(values) else None


def ensemble_gap(frame: pd.DataFrame) -> pd.Series:
    """The graph ensemble's band gap (mean of the GNN and LightGBM readings present)."""
    columns = [c for c in ("band_gap_gnn", "band_gap_gbm") if c in frame]
    return frame[columns].astype(float).mean(axis=1) if columns else pd.Series(np.nan, index=frame.index)


def pooled_vun(rounds: list[dict], window: int) -> float:
    """valid∧unique∧novel over the last `window` rounds' samples together (one round of 64–96 is
    too noisy to judge a 5-point fall: a binomial SE of about 3 points)."""
    recent = rounds[-window:]
    return sum(r["valid_unique_novel"] * r["n"] for r in recent) / max(sum(r["n"] for r in recent), 1)


def round_report(frame: pd.DataFrame, relaxed: list[dict], examples: list[Example], free_valid: float | None) -> dict:
    """Rates over all samples (stable, VSUN, hit, uniqueness, novelty) and the sliders' response."""
    rates = summarise(frame)
    valid = frame[frame["valid"].astype(bool)]
    with_gap = valid[valid["band_gap_target"].notna()]
    return {
        "n": int(len(frame)), **{k: round(v, 4) for k, v in rates.items() if k not in ("n", "mean_abs_error")},
        "unique_of_valid": round(float(valid["unique"].fillna(False).astype(bool).mean()), 4) if len(valid) else None,
        "novel_of_valid": round(float(valid["novel"].fillna(False).astype(bool).mean()), 4) if len(valid) else None,
        "median_e_hull": median_or_none(valid["e_hull_pred"]),
        "median_e_hull_at_0": median_or_none(valid.loc[valid["e_hull_target"] == 0.0, "e_hull_pred"]),
        "median_e_hull_at_0.5": median_or_none(valid.loc[valid["e_hull_target"] == 0.5, "e_hull_pred"]),
        "e_hull_spearman": spearman(valid["e_hull_target"], valid["e_hull_pred"]),
        "band_gap_spearman": spearman(with_gap["band_gap_target"], with_gap["band_gap_pred"]),
        # the graph ensemble (GNN + LightGBM) beside the head: a gain only the head sees is suspect
        "band_gap_spearman_ensemble": spearman(with_gap["band_gap_target"], ensemble_gap(with_gap)),
        "mean_reward": round(float(frame["reward"].mean()), 4),
        "relaxed_n": sum(1 for r in relaxed if r.get("valid")),
        "relax_failures": [r.get("error") for r in relaxed if not r.get("valid")][:3],
        "median_e_hull_relaxed": median_or_none([r.get("e_hull_pred") for r in relaxed if r.get("valid")]),
        "median_e_hull_static_of_relaxed": median_or_none([r.get("e_hull_static") for r in relaxed if r.get("valid")]),
        "median_gap_relaxed": median_or_none([r.get("band_gap_pred") for r in relaxed if r.get("valid")]),
        "free_decoding_valid": free_valid,
        "examples": {signal: sum(e.signal == signal for e in examples)
                     for signal in ("hindsight", "rejection", "relaxed", "replay")},
    }


# ---- the loop ------------------------------------------------------------------------------
def has_elements(formula, required: list[str] | None) -> bool:
    """Whether a formula holds every required element (True when none are required)."""
    if not required:
        return True
    try:
        return set(required) <= {el.symbol for el in Composition(str(formula)).elements}
    except Exception:  # no formula (an invalid sample): nothing to reward
        return False


def add_rewards(frame: pd.DataFrame, settings: AlignSettings) -> pd.DataFrame:
    frame = frame.copy()
    frame["reward"] = [reward({k: (None if pd.isna(v) else v) for k, v in row.items()},
                              known(row["band_gap_target"]), known(row["e_hull_target"]), settings.reward)
                       if has_elements(row.get("formula"), settings.required_elements) else 0.0
                       for row in frame.to_dict("records")]
    return frame


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """The model in eval mode with no gradients: DPO's reference."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def align(out: Path, base: str | Path | None = None, settings: AlignSettings | None = None,
          replay_source: Path | None = None, on_round: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> Path:
    """Run (or resume) the rounds; returns the directory of the last accepted model."""
    settings = settings or AlignSettings()
    settings.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {
        "base": str(resolve_model_dir(base)), "settings": asdict(settings), "rounds": [], "current": None,
        "first_vun": None, "stopped": None}
    current = Path(state["current"] or state["base"])
    model = load_model_weights(current, dtype=torch.float32).eval()
    cfg = TrainConfig(learning_rate=settings.learning_rate, grad_clip=1.0)
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = settings.learning_rate
    max_tokens = model.config.max_cif_tokens
    replay = replay_pool(settings.replay_per_round * settings.rounds, max_tokens, settings.seed, replay_source) \
        if settings.signals.replay else []
    reference = frozen(load_model_weights(Path(state["base"]), dtype=torch.float32)) \
        if settings.signals.preference else None
    scorer = StructureScorer(stability=True, novelty=True)
    started = time.perf_counter()
    first = len(state["rounds"])
    bar = tqdm(total=settings.rounds, initial=first, desc="align rounds", unit="round")
    for r in range(first, settings.rounds):
        if state["stopped"] or (should_stop is not None and should_stop()):
            break
        if settings.minutes is not None and time.perf_counter() - started > settings.minutes * 60:
            state["stopped"] = f"time budget of {settings.minutes:g} min reached"
            break
        round_start = time.perf_counter()
        loaded = load_model(current, dtype=inference_dtype("cpu"))
        n_samples = settings.cells_per_round * settings.samples_per_cell
        with tqdm(total=n_samples, desc=f"round {r} samples", unit="cif", leave=False) as samples_bar:
            run = sample_round(loaded, settings, r, lambda: samples_bar.update(1), should_stop)
        if run is None:
            break
        free_valid = free_validity(loaded, settings, r)
        score_candidates(run.candidates, scorer)
        frame = add_rewards(run.to_frame(MetricSettings()), settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            relaxed = relax_share(frame, run.candidates, scorer, settings, r)
        taught = set(state.setdefault("taught", []))
        tokens = encoded_samples(frame, run.candidates, loaded.tokenizer, max_tokens)
        examples = round_examples(frame, tokens, relaxed, loaded.tokenizer, settings, max_tokens, taught)
        state["taught"] = sorted(taught)
        examples += replay[r * settings.replay_per_round : (r + 1) * settings.replay_per_round]
        pairs = preference_pairs(frame, tokens, settings) if reference is not None else []
        report = round_report(frame, relaxed, examples, free_valid)
        report["examples"]["preference_pairs"] = len(pairs)
        state["first_vun"] = report["valid_unique_novel"] if state["first_vun"] is None else state["first_vun"]
        vun = pooled_vun([*state["rounds"][1:], report], settings.guard_window)  # round 0 is the base model
        round_dir = out / f"round_{r:03d}"
        round_dir.mkdir(exist_ok=True)
        frame.drop(columns=["reason", "notes"], errors="ignore").to_csv(round_dir / "samples.csv", index=False)
        relabelled_table(frame, run.candidates, relaxed, f"{out.name}-r{r}").to_csv(round_dir / RELABELLED_FILE,
                                                                                    index=False)
        if vun < state["first_vun"] - settings.max_vun_drop:
            state["stopped"] = (f"collapse guard: valid∧unique∧novel {vun:.1%} (last {settings.guard_window} rounds) "
                                f"fell more than {settings.max_vun_drop:.0%} below the first round's "
                                f"{state['first_vun']:.1%}")
            report["accepted"] = False
        else:
            report["training"] = fine_tune_round(model, optimizer, examples, settings, cfg, r)
            if pairs:
                report["training"].update(preference_round(model, reference, optimizer, pairs, settings, r))
            current = save_model(model, round_dir / "model", {
                "name": f"crystallm-studio-pkv-aligned-r{r}", "aligned_from": state["base"], "round": r,
                "trained_on": "reward fine-tuning rounds on the model's own judged samples + MP-20 replay"},
                dtype=torch.bfloat16)
            for extra in ("training_data_stats.json",):  # the UI's density hints come with the base model
                source = Path(state["base"]) / extra
                if source.is_file():
                    (current / extra).write_text(source.read_text())
            state["current"] = str(current)
            report["accepted"] = True
        report.update(round=r, seconds=round(time.perf_counter() - round_start, 1))
        (round_dir / "report.json").write_text(json.dumps(report, indent=1))
        state["rounds"].append(report)
        state_path.write_text(json.dumps(state, indent=1))
        bar.update(1)
        bar.set_postfix(stable=report["stable"], vsun=report["vsun"], hull=report["median_e_hull"])
        if on_round is not None:
            on_round(report)
    bar.close()
    state_path.write_text(json.dumps(state, indent=1))
    return Path(state["current"] or state["base"])


# ---- command line -------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="run folder (resumes if it holds state.json)")
    parser.add_argument("--from", dest="base", default=None, help="starting model (default: the shipped model)")
    parser.add_argument("--rounds", type=int, default=AlignSettings.rounds)
    parser.add_argument("--minutes", type=float, default=None, help="start no new round after this long")
    parser.add_argument("--cells", type=int, default=AlignSettings.cells_per_round, help="target cells per round")
    parser.add_argument("--samples-per-cell", type=int, default=AlignSettings.samples_per_cell)
    parser.add_argument("--relax-per-round", type=int, default=AlignSettings.relax_per_round)
    parser.add_argument("--replay-per-round", type=int, default=AlignSettings.replay_per_round)
    parser.add_argument("--learning-rate", type=float, default=AlignSettings.learning_rate)
    parser.add_argument("--temperature", type=float, default=AlignSettings.temperature,
                        help="the rounds' sampling temperature (1.0: self-training does not sharpen the model)")
    parser.add_argument("--seed", type=int, default=AlignSettings.seed)
    parser.add_argument("--no", nargs="*", default=[], choices=[f.name for f in AlignSignals.__dataclass_fields__.values()],
                        help="signals to switch off (ablations)")
    parser.add_argument("--with", dest="extra", nargs="*", default=[], choices=["preference"],
                        help="signals off by default to switch on (preference: DPO against the base model)")
    parser.add_argument("--data-dir", type=Path, default=None, help="shared data for replay (default: ../shared/data)")


def run(args: argparse.Namespace) -> int:
    if set(args.no) & set(args.extra):
        print(f"error: a signal cannot be both switched off and on: {', '.join(sorted(set(args.no) & set(args.extra)))}")
        return 2
    settings = AlignSettings(rounds=args.rounds, minutes=args.minutes, cells_per_round=args.cells,
                             samples_per_cell=args.samples_per_cell, relax_per_round=args.relax_per_round,
                             replay_per_round=args.replay_per_round, learning_rate=args.learning_rate, seed=args.seed,
                             temperature=args.temperature,
                             signals=AlignSignals(**{name: False for name in args.no},
                                                  **{name: True for name in args.extra}))
    final = align(args.out, args.base, settings, args.data_dir,
                  on_round=lambda report: tqdm.write(json.dumps({k: report[k] for k in (
                      "round", "valid", "stable", "vsun", "valid_unique_novel", "median_e_hull", "band_gap_spearman",
                      "median_e_hull_at_0", "median_e_hull_at_0.5", "median_e_hull_relaxed", "seconds")})))
    print(f"model after the last accepted round: {final}")
    return 0
