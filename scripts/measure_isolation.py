"""What checking in the isolated worker costs per structure, against checking in-process.

    nice -n 15 python scripts/measure_isolation.py [--mp 100] [--repeats 3] [--out isolation.json]

The same CIFs (the test prototypes and Materials Project CIFs from shared/data/mp20, as the
model writes them) are checked by `check_cif` in this process and by `check_cif_isolated` in
a dedicated, already started worker, alternately; the difference is the pickling and the pipe.
Also reported: how long a worker takes to start (paid once, and again after a crash).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # run from a checkout; tests/prototypes.py, tests/fuzz_*.py

from fuzz_corpus import shared_cifs  # noqa: E402
from prototypes import all_prototypes  # noqa: E402
from pymatgen.core import Structure  # noqa: E402

from crystallm_core.chem.cif.cif_format import repair_generated_cif, structure_to_model_cif  # noqa: E402
from crystallm_core.chem.judges.isolation import (  # noqa: E402
    IsolatedWorker,
    check_cif_isolated,
    check_with_limits,
)


def written_cifs(mp: int) -> list[str]:
    """CIFs as generation checks them: the model's form, repaired."""
    structures = list(all_prototypes().values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structures += [Structure.from_str(text, fmt="cif") for text in shared_cifs(REPO.parent / "shared" / "data" / "mp20", mp)]
        return [repaired.cif for s in structures if (repaired := repair_generated_cif(structure_to_model_cif(s))).ok]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mp", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cifs = written_cifs(args.mp)
    worker = IsolatedWorker(check_with_limits)
    started = time.perf_counter()
    worker.start()
    start_seconds = time.perf_counter() - started
    in_process, isolated = [], []
    for _ in range(args.repeats):
        for cif in cifs:
            t0 = time.perf_counter()
            check_with_limits(cif)
            t1 = time.perf_counter()
            check_cif_isolated(cif, worker)
            in_process.append(t1 - t0)
            isolated.append(time.perf_counter() - t1)
    worker.close()
    extra = [b - a for a, b in zip(in_process, isolated)]
    result = {"structures": len(cifs), "checks_each_way": len(in_process),
              "worker_start_seconds": round(start_seconds, 2),
              "in_process_median_ms": round(1000 * statistics.median(in_process), 1),
              "isolated_median_ms": round(1000 * statistics.median(isolated), 1),
              "extra_median_ms": round(1000 * statistics.median(extra), 1),
              "extra_mean_ms": round(1000 * statistics.mean(extra), 1),
              "extra_share_of_median_check": round(statistics.median(extra) / statistics.median(in_process), 3)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
