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
DIR/state.json; a killed run resumes at the next round. The collapse guard stops the run, and
does not take the round's update, when the valid∧unique∧novel rate of the last `guard_window`
rounds falls more than `max_vun_drop` below the first round's (the base model's), or when the
round's prototype variety (distinct anonymous formula + space group per valid sample) falls
below `min_variety_ratio` of the first round's: lost variety comes long before exact repeats.
Each signal teaches a (formula, space group) once per run, so it cannot keep reinforcing one
structure.
Sampling seeds start at `seed` (default 1,000,000), far from the evaluation protocols' seeds.

The settings and target cells live in `align_settings`, the examples each signal makes in
`align_examples`, the round's numbers in `align_report`; this module runs the rounds.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from pymatgen.core import Composition
from tqdm import tqdm

from crystallm_core.chem.data.data_prep import RELABELLED_FILE
from crystallm_core.chem.judges.metrics import MetricSettings
from crystallm_core.chem.judges.reward import reward
from crystallm_core.chem.judges.scoring import StructureScorer
from crystallm_core.chem.judges.relaxation import relax_and_check_many
from crystallm_core.lm.checkpoints import inference_dtype, load_model, load_model_weights, resolve_model_dir, save_model
from crystallm_core.lm.conditions import condition_vector
from crystallm_core.lm.packed_batch import PackedBatch
from crystallm_core.lm.preference import PreferencePair, preference_step
from crystallm_core.lm.sampler import SamplingSettings, choose_int8, linear_layers
from crystallm_core.lm.training import TrainConfig, condition_dropout, make_optimizer, training_step
from crystallm_core.product.align_examples import (
    Example,
    encoded_samples,
    known,
    preference_pairs,
    prototypes,
    relabelled_table,
    replay_pool,
    round_examples,
)
from crystallm_core.product.align_report import pooled_vun, round_report
from crystallm_core.product.align_settings import AlignSettings, AlignSignals, round_cells
from crystallm_core.product.evaluate import score_candidates
from crystallm_core.product.generation import GenerationRequest, generate


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
    forward per optimiser step for the batch, symmetry kept); each result re-checked and re-scored."""
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
    """Each sample's reward; with `repeat_penalty` p > 0 divided by n^p, n the round's valid samples
    of its prototype (group-relative variety: the tenth A2BF6 of a round earns a fraction of the first's)."""
    frame = frame.copy()
    frame["reward"] = [reward({k: (None if pd.isna(v) else v) for k, v in row.items()},
                              known(row["band_gap_target"]), known(row["e_hull_target"]), settings.reward)
                       if has_elements(row.get("formula"), settings.required_elements) else 0.0
                       for row in frame.to_dict("records")]
    if settings.repeat_penalty > 0:
        kinds = prototypes(frame)
        counts = kinds.map(kinds.value_counts()).fillna(1.0)
        frame["reward"] = frame["reward"] / counts.astype(float) ** settings.repeat_penalty
    return frame


def collapse_reason(vun: float | None, variety: float | None, state: dict, settings: AlignSettings) -> str | None:
    """Why the run must stop (None: it may go on): valid∧unique∧novel of the last rounds (None
    until there are enough) more than `max_vun_drop` below the first round's, or prototype
    variety below `min_variety_ratio` of it."""
    if vun is not None and vun < state["first_vun"] - settings.max_vun_drop:
        return (f"valid∧unique∧novel {vun:.1%} (last {settings.guard_window} rounds) fell more than "
                f"{settings.max_vun_drop:.0%} below the first round's {state['first_vun']:.1%}")
    first = state.get("first_variety")
    if variety is not None and first and variety < settings.min_variety_ratio * first:
        return (f"prototype variety {variety:.2f} fell below {settings.min_variety_ratio:.0%} of the first "
                f"round's {first:.2f} (the model is collapsing onto a few structure types)")
    return None


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
        choose_int8(loaded.model)  # int8 products where they sample faster (an AVX2 CPU), as the app's warm-up
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
        report["linear_layers"] = linear_layers(loaded.model)  # how this round sampled
        state["first_vun"] = report["valid_unique_novel"] if state["first_vun"] is None else state["first_vun"]
        state["first_variety"] = state.get("first_variety") or report["prototype_variety"]
        vun = pooled_vun([*state["rounds"][1:], report], settings.guard_window)  # round 0 is the base model
        round_dir = out / f"round_{r:03d}"
        round_dir.mkdir(exist_ok=True)
        frame.drop(columns=["reason", "notes"], errors="ignore").to_csv(round_dir / "samples.csv", index=False)
        relabelled_table(frame, run.candidates, relaxed, f"{out.name}-r{r}").to_csv(round_dir / RELABELLED_FILE,
                                                                                    index=False)
        collapse = collapse_reason(vun, report["prototype_variety"], state, settings)
        if collapse:
            state["stopped"] = f"collapse guard: {collapse}"
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
    parser.add_argument("--repeat-penalty", type=float, default=AlignSettings.repeat_penalty,
                        help="divide a reward by n^p, n = the round's valid samples of its prototype (0: off)")
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
                             temperature=args.temperature, repeat_penalty=args.repeat_penalty,
                             signals=AlignSignals(**{name: False for name in args.no},
                                                  **{name: True for name in args.extra}))
    final = align(args.out, args.base, settings, args.data_dir,
                  on_round=lambda report: tqdm.write(json.dumps({k: report[k] for k in (
                      "round", "valid", "stable", "vsun", "valid_unique_novel", "median_e_hull", "band_gap_spearman",
                      "median_e_hull_at_0", "median_e_hull_at_0.5", "median_e_hull_relaxed", "seconds")})))
    print(f"model after the last accepted round: {final}")
    return 0
