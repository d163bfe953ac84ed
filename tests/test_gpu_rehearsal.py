"""The prepared GPU command, rehearsed on the CPU with a tiny model: it trains through the fast
step, packs its results into parts of at most 15 MiB, and the unpacked model loads."""
import os
import subprocess
import tarfile
from pathlib import Path

import torch
from test_training import write_token_cache

from crystallm_core.lm.checkpoints import load_model

REPO = Path(__file__).resolve().parent.parent
TINY = ["n_layer=1", "n_head=2", "n_embd=32", "n_hidden_cond=16", "batch_size=8", "max_steps=8", "eval_every=4",
        "eval_rows=16", "checkpoint_every=4", "log_every=4", "warmup_steps=2", "device=\"cpu\""]


def test_gpu_train_script_rehearsed_on_cpu(tmp_path):
    write_token_cache(tmp_path / "tokens.npz", repeats=2)
    out = tmp_path / "out"
    env = {**os.environ, "DATA": str(tmp_path / "tokens.npz"), "WORK": str(tmp_path / "work")}
    result = subprocess.run(["bash", "scripts/gpu_train.sh", str(out), "120", "0", *TINY], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert "generator exit 0" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    parts = sorted(out.glob("result.tgz.part-*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    (tmp_path / "result.tgz").write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(tmp_path / "result.tgz") as archive:
        archive.extractall(tmp_path / "home", filter="data")
    loaded = load_model(tmp_path / "home" / "gen" / "model", dtype=torch.float32)
    assert loaded.model.config.n_layer == 1
    log = (tmp_path / "home" / "gen.log").read_text()
    assert "fp32" in log or "bf16" in log  # the fast step says which precision it chose
