"""Markdown tables of `align` runs' round reports, for the model card: one row per round, and
with several runs an ablation table comparing them round by round (the same rounds sample the
same target cells with the same seeds, so a row differs only by what the runs learned from).

    python scripts/align_table.py runs/align_a [runs/align_b ...] [--pool 3]

`--pool K` adds, per run, the rates pooled over its last K common rounds (K × 96 samples
narrow the binomial noise of one round, about ±4 points at 96).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from crystallm_core.product.align_report import pooled_rate  # noqa: E402

COLUMNS = ("valid", "stable", "vsun", "valid_unique_novel", "unique_of_valid", "prototype_variety", "median_e_hull", "band_gap_spearman",
           "band_gap_spearman_ensemble", "median_e_hull_relaxed", "free_decoding_valid")
RATES = ("valid", "stable", "vsun", "valid_unique_novel")


def cell(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def rounds_of(run: Path) -> list[dict]:
    return json.loads((run / "state.json").read_text())["rounds"]


def run_table(run: Path) -> str:
    lines = [f"| round | {' | '.join(COLUMNS)} | examples | accepted |", "|" + "---|" * (len(COLUMNS) + 3)]
    for report in rounds_of(run):
        examples = "/".join(str(v) for v in report.get("examples", {}).values())
        lines.append(f"| {report['round']} | {' | '.join(cell(report.get(c)) for c in COLUMNS)} | {examples} | "
                     f"{report.get('accepted')} |")
    return "\n".join(lines)


def pooled(reports: list[dict]) -> dict:
    return {"n": sum(r["n"] for r in reports), **{k: pooled_rate(reports, k) for k in RATES}}


def ablation_table(runs: list[Path], pool: int) -> str:
    common = min(len(rounds_of(run)) for run in runs)
    lines = [f"Rounds {common - pool}…{common - 1} pooled (the same cells and seeds in every run):", "",
             f"| run | samples | {' | '.join(RATES)} |", "|" + "---|" * (len(RATES) + 2)]
    for run in runs:
        rates = pooled(rounds_of(run)[common - pool : common])
        lines.append(f"| {run.name} | {rates['n']} | {' | '.join(f'{rates[k]:.1%}' for k in RATES)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--pool", type=int, default=3)
    args = parser.parse_args()
    for run in args.runs:
        print(f"### {run}\n\n{run_table(run)}\n")
    if len(args.runs) > 1:
        print(ablation_table(args.runs, args.pool))
    return 0


if __name__ == "__main__":
    sys.exit(main())
