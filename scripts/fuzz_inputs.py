"""Fuzz every CIF reader with hostile text, and time the pathological inputs (issue 9).

    nice -n 15 python scripts/fuzz_inputs.py [--n 100000] [--hypothesis 10000] [--seed 0]
                                             [--generated 12] [--out fuzz_report.json]

Seeds: the test prototypes' CIFs in four forms, Materials Project CIFs from shared/data/mp20
(when present) and raw texts the shipped model writes (free decoding). Inputs: `--hypothesis`
from the hypothesis strategies, the rest from the mutation corpus (distinct texts only). Each
goes through repair → validity in the isolated checker (per-check limit 10 s) → the Explore
page's parse, description and XRD; every sane structure is scored by the band-gap surrogate
(batches of 64) and one batch in `--full-score-every` also by CHGNet and novelty.
Reports: inputs, findings (uncaught exceptions, unreadable reasons), worst time per input,
share rejected, share whose reason is a bare exception text, the most common reasons.
Single-threaded (torch and BLAS pinned to one thread).
"""
from __future__ import annotations

import os

for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # run from a checkout; tests/prototypes.py, tests/fuzz_*.py

import torch  # noqa: E402
from fuzz_corpus import (  # noqa: E402
    mutant_strategy,
    mutants,
    pathological_cifs,
    seed_corpus,
    shared_cifs,
    text_strategy,
)
from fuzz_pipeline import FuzzOutcome, Scoring, run_one  # noqa: E402
from prototypes import all_prototypes  # noqa: E402

from crystallm_core.chem.judges.isolation import IsolatedWorker, check_with_limits  # noqa: E402
from crystallm_core.chem.judges.scoring import StructureScorer  # noqa: E402


def generated_texts(n: int) -> list[str]:
    """Raw texts of the shipped model (free decoding: about half fail a check)."""
    if n <= 0:
        return []
    from crystallm_core.lm.checkpoints import load_model
    from crystallm_core.lm.sampler import SamplingSettings
    from crystallm_core.product.generation import GenerationRequest, generate

    run = generate(load_model(None), GenerationRequest(band_gap=1.5, e_hull=0.0, n=n, seed=0,
                                                       settings=SamplingSettings(decoding="free")))
    return [c.raw_text for c in run.candidates if c.raw_text]


class Tally:
    """Everything the report needs, input by input."""

    def __init__(self, examples_dir: Path):
        self.inputs = self.rejected = self.raw = 0
        self.findings: Counter = Counter()
        self.reasons: Counter = Counter()
        self.worst: list[tuple[float, str, str]] = []  # (seconds, origin, text head)
        self.stage_worst: Counter = Counter()
        self.examples_dir = examples_dir

    def add(self, text: str, origin: str, outcome: FuzzOutcome) -> None:
        self.inputs += 1
        if not outcome.valid:
            self.rejected += 1
            self.raw += outcome.raw_reason
            for reason in outcome.reasons[-1:]:
                self.reasons[reason[:90]] += 1
        for finding in outcome.findings:
            key = finding[:160]
            if not self.findings[key]:
                self.examples_dir.mkdir(parents=True, exist_ok=True)
                (self.examples_dir / f"finding_{len(self.findings):03d}.txt").write_text(
                    f"# {finding}\n# {origin}\n{text}", errors="replace")
            self.findings[key] += 1
        for stage, seconds in outcome.stage_seconds.items():
            self.stage_worst[stage] = max(self.stage_worst[stage], seconds)
        self.worst = sorted([*self.worst, (outcome.seconds, origin, text[:120])], reverse=True)[:5]

    def report(self) -> dict:
        return {"inputs": self.inputs, "findings": sum(self.findings.values()), "distinct_findings": dict(self.findings),
                "rejected_share": round(self.rejected / max(self.inputs, 1), 4),
                "bare_exception_reason_share_of_rejected": round(self.raw / max(self.rejected, 1), 4),
                "worst_seconds_per_input": round(self.worst[0][0], 2) if self.worst else None,
                "worst_inputs": [{"seconds": round(s, 2), "origin": o, "head": h} for s, o, h in self.worst],
                "worst_seconds_per_stage": {k: round(v, 2) for k, v in self.stage_worst.items()},
                "top_reasons": self.reasons.most_common(25)}


def hypothesis_inputs(seeds: list[str], n: int, handle) -> None:
    """n inputs drawn by the hypothesis strategies, each handed to `handle(text, origin)`."""
    if n <= 0:
        return
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate], derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(mutant_strategy(seeds), text_strategy()))
    def drive(text: str) -> None:
        handle(text, "hypothesis")

    drive()


def pathological(worker: IsolatedWorker, scorer: StructureScorer) -> list[dict]:
    rows = []
    for name, text in pathological_cifs().items():
        outcome = run_one(text, worker)
        scoring = Scoring(scorer, batch=1)
        if outcome.structure is not None:
            scoring.add(outcome.structure)
        rows.append({"input": name, "seconds": round(outcome.seconds + scoring.seconds, 2),
                     "stages": {k: round(v, 2) for k, v in outcome.stage_seconds.items()},
                     "score_seconds": round(scoring.seconds, 2), "valid": outcome.valid,
                     "reason": "; ".join(outcome.reasons) or "passes every check",
                     "findings": outcome.findings + scoring.findings})
        print(f"  {rows[-1]['seconds']:7.2f} s  {name}: {rows[-1]['reason']}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="inputs in all (hypothesis ones included)")
    parser.add_argument("--hypothesis", type=int, default=10_000, help="of which drawn by the hypothesis strategies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mp", type=int, default=300, help="Materials Project CIFs to seed with (shared/data)")
    parser.add_argument("--generated", type=int, default=12, help="raw model outputs to seed with")
    parser.add_argument("--full-score-every", type=int, default=50,
                        help="every k-th batch is also scored by CHGNet and novelty")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early and report what was done")
    parser.add_argument("--no-pathological", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("fuzz_report.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()

    seeds = seed_corpus(list(all_prototypes().values()),
                        shared_cifs(REPO.parent / "shared" / "data" / "mp20", args.mp) + generated_texts(args.generated))
    print(f"{len(seeds)} seed texts", flush=True)
    worker = IsolatedWorker(check_with_limits)
    surrogate, full = StructureScorer(stability=False, novelty=False), StructureScorer()
    report: dict = {"seeds": len(seeds), "settings": vars(args) | {"out": str(args.out)}}
    if not args.no_pathological:
        print("pathological inputs:", flush=True)
        report["pathological"] = pathological(worker, full)

    tally = Tally(args.out.parent / "fuzz_findings")
    scorings = [Scoring(surrogate), Scoring(full)]
    seen: set[int] = set()
    scorable = [0]

    deadline = started + 60 * args.max_minutes if args.max_minutes else float("inf")

    def handle(text: str, origin: str) -> None:
        key = hash(text)
        if key in seen or time.perf_counter() > deadline:
            return
        seen.add(key)
        outcome = run_one(text, worker)
        tally.add(text, origin, outcome)
        if outcome.structure is not None:
            batch = scorable[0] // scorings[0].batch
            scorings[batch % args.full_score_every == 1].add(outcome.structure)
            scorable[0] += 1
        if tally.inputs % 1000 == 0:
            write_report()
            print(f"  {tally.inputs} inputs, {sum(tally.findings.values())} findings, "
                  f"worst {tally.worst[0][0]:.2f} s, {time.perf_counter() - started:.0f} s", flush=True)

    def write_report() -> None:
        report.update(tally.report())
        report["findings"] += sum(len(s.findings) for s in scorings)
        report["scoring"] = [{"scorer": name, "structures": s.scored, "seconds": round(s.seconds, 1),
                              "findings": s.findings[:20]} for name, s in zip(("surrogate", "full"), scorings)]
        report["checker_restarts"] = worker.restarts
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False))

    hypothesis_inputs(seeds, min(args.hypothesis, args.n), handle)
    for text, names in mutants(seeds, random.Random(args.seed)):
        if tally.inputs >= args.n or time.perf_counter() > deadline:
            break
        handle(text, "+".join(names))
    for scoring in scorings:
        scoring.flush()
    worker.close()
    write_report()
    print(json.dumps({k: report[k] for k in ("inputs", "findings", "rejected_share", "worst_seconds_per_input",
                                             "bare_exception_reason_share_of_rejected", "wall_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
