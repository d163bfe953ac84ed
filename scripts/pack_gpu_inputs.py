"""Pack what `scripts/gpu_train.sh` needs into data/gpu/ (compressed, to carry to a lent GPU).

    python scripts/pack_gpu_inputs.py     # after prepare-data (and the surrogates' graph cache)

tokens.npz shrinks from about 33 MB to 5 MB; the GPU machine has numpy but no pymatgen, so
everything it trains on must be arrays.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from crystallm_core.paths import cache_dir

OUT = Path("data/gpu")
FILES = ("tokens.npz", "surrogate_graphs.npz")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        source = cache_dir() / name
        if not source.is_file():
            print(f"skipped {name}: {source} does not exist")
            continue
        with np.load(source, allow_pickle=False) as arrays:
            np.savez_compressed(OUT / name, **{key: arrays[key] for key in arrays.files})
        print(f"{source} → {OUT / name} ({(OUT / name).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
