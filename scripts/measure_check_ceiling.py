"""The validity checks' ceiling: how many REAL test-split structures pass them.

    python scripts/measure_check_ceiling.py [--n 300] [--out ceiling.json]

Each structure from `data/cache/dataset.parquet` (written by `prepare-data`) is rendered as a
model CIF, repaired and checked exactly like a generated one (`isolation.check_sample`). What
fails here is the checks' strictness, not the model's fault.
"""
from __future__ import annotations

import argparse
import json
import warnings
from collections import Counter
from pathlib import Path

import pandas as pd
from pymatgen.core import Structure

from crystallm_core.chem.cif.cif_format import structure_to_model_cif
from crystallm_core.chem.judges.isolation import check_sample
from crystallm_core.paths import cache_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    table = pd.read_parquet(cache_dir() / "dataset.parquet")
    test = table[table.split == "test"].sample(n=args.n, random_state=args.seed)
    failed, valid, by_source, seen = Counter(), 0, Counter(), Counter()
    reasons = []
    for row in test.itertuples():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            text = structure_to_model_cif(Structure.from_str(row.cif, fmt="cif"))
            _, report = check_sample(text, "eos", 0)
        seen[row.source] += 1
        valid += report.valid
        by_source[row.source] += report.valid
        failed.update(c.name for c in report.checks if not c.passed)
        if not report.valid:
            reasons.append({"id": row.id, "reasons": report.failed_reasons})
    summary = {"n": args.n, "valid": valid / args.n, "valid_by_source": {k: by_source[k] / seen[k] for k in seen},
               "failed_checks": dict(failed), "failures": reasons}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
