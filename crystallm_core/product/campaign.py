"""Screening campaigns: many targets × many samples, on Ray, resumable and exact.

    python -m crystallm_core campaign SPEC.toml --out DIR [--address auto|ray://host:10001] [--workers N]
    python -m crystallm_core campaign status DIR

Pipeline: work items (target × chunk, `campaign_spec`) → sampler actors (the model loaded once
per actor; generation and the validity checks) → scorer actors (surrogate, CHGNet, novelty
loaded once per actor), running while the samplers go on → the driver writes each chunk as it
arrives: its valid CIFs under cifs/, then rows/KEY.parquet (atomically). A chunk is done when
its Parquet file exists; running the command again on DIR skips those, so nothing is drawn
twice or lost, and every chunk has its own seed, so the rows do not depend on the number of
workers or their order. With `valid_per_target`, `campaign_plan.ChunkPlan` decides which chunks
are needed and kept, in a way that keeps that true. rows/ is one Parquet dataset:
`pandas.read_parquet(DIR / "rows")`.

Why Ray core actors rather than Ray Data's `map_batches`: the unit of work, of commit and of
resumption is a chunk with its own seed, and each stage holds a heavy model per process.
Actors with a small in-flight window give exactly that with per-chunk results in hand; a Ray
Data pipeline would stream rows through blocks whose boundaries we do not own, and resuming
it exactly would need the same bookkeeping on top.

By default Ray starts in-process on this machine (a laptop needs no cluster); `--address`
attaches to a running cluster unchanged (every node needs this package installed).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from crystallm_core.chem.judges.metrics import MetricSettings
from crystallm_core.chem.judges.ranking import RankingSettings, pick_best, rank_scores, ranking_order
from crystallm_core.chem.judges.scoring import StructureScorer
from crystallm_core.chem.judges.stability import RelaxSettings
from crystallm_core.chem.judges.structure_info import parse_cif
from crystallm_core.chem.judges.validity import CheckResult, ValidityReport
from crystallm_core.product.campaign_plan import ChunkPlan
from crystallm_core.product.campaign_spec import CampaignSpec, WorkItem
from crystallm_core.product.evaluate import score_candidates
from crystallm_core.product.generation import generate, model_record
from crystallm_core.product.run import Candidate, Run, Scores
from crystallm_core.product.versions import package_versions

ROWS, CIFS, MANIFEST = "rows", "cifs", "campaign.json"
IN_FLIGHT = 2  # chunks queued per sampler, so none waits between chunks


class Sampler:
    """Generation of chunks with one loaded model (a Ray actor, or in-process)."""

    def __init__(self, spec: CampaignSpec, threads: int | None = None):
        from crystallm_core.lm.checkpoints import load_model
        from crystallm_core.lm.sampler import warm_up

        self.spec, self.loaded = spec, load_model(spec.model)
        # Compile the kernel now; of 1 thread and this worker's share, keep the faster (a
        # lone actor with two OpenMP threads on two busy cores ran 6x slower than two actors of one).
        warm_up(self.loaded.model, max_threads=threads)

    def model_record(self) -> dict:
        return model_record(self.loaded)

    def run(self, item: WorkItem) -> tuple[WorkItem, list[Candidate]]:
        return item, generate(self.loaded, self.spec.request(item)).candidates


class Scorer:
    """The scores the spec asks for, of valid candidates (a Ray actor, or in-process)."""

    def __init__(self, scores: dict):
        self.scorer = StructureScorer(stability=scores["stability"], novelty=scores["novelty"],
                                      surrogate=scores["surrogate"],
                                      relax=RelaxSettings() if scores["relax"] else None)

    def run(self, item: WorkItem, candidates: list[Candidate]) -> tuple[WorkItem, list[Candidate], dict]:
        score_candidates(candidates, self.scorer)
        return item, candidates, dict(self.scorer.unavailable)


def chunk_frame(item: WorkItem, candidates: list[Candidate]) -> pd.DataFrame:
    """The chunk's rows: the Run table (no cross-chunk uniqueness) plus target, chunk, seed and CIF."""
    frame = Run(candidates, versions={}).to_frame(unique=False)
    frame.insert(0, "target", item.target.index)
    frame.insert(1, "chunk", item.chunk)
    frame.insert(2, "seed", item.seed)
    frame["file"] = [f"{item.key}_{c.file_name}" for c in candidates]
    frame["cif"] = [c.cif for c in candidates]
    return frame


@dataclass
class CampaignDir:
    """The campaign's directory: manifest, rows/ (a chunk per Parquet file) and cifs/."""

    path: Path

    def done(self) -> set[str]:
        rows = self.path / ROWS
        return {p.stem for p in rows.glob("*.parquet")} if rows.is_dir() else set()

    def write_chunk(self, item: WorkItem, frame: pd.DataFrame) -> None:
        (self.path / CIFS).mkdir(parents=True, exist_ok=True)
        for name, cif, valid in zip(frame["file"], frame["cif"], frame["valid"]):
            if valid and cif:
                (self.path / CIFS / name).write_text(cif)
        (self.path / ROWS).mkdir(exist_ok=True)
        temporary = self.path / ROWS / f".{item.key}.tmp"
        frame.to_parquet(temporary, index=False)
        temporary.replace(self.path / ROWS / f"{item.key}.parquet")  # the commit

    def valid_counts(self) -> dict[str, int]:
        """Chunk key → valid samples, of every chunk on disk."""
        if not self.done():
            return {}
        rows = pd.read_parquet(self.path / ROWS, columns=["target", "chunk", "valid"])
        return {f"t{t:04d}_c{c:05d}": int(v) for (t, c), v in rows.groupby(["target", "chunk"])["valid"].sum().items()}

    def rows(self) -> pd.DataFrame:
        if not self.done():
            return pd.DataFrame()
        return pd.read_parquet(self.path / ROWS).sort_values(["target", "chunk", "index"], ignore_index=True)

    def write_manifest(self, manifest: dict) -> None:
        temporary = self.path / f".{MANIFEST}.tmp"
        temporary.write_text(json.dumps(manifest, indent=2, default=str))
        temporary.replace(self.path / MANIFEST)

    def manifest(self) -> dict:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}


def check_same_campaign(directory: CampaignDir, spec: CampaignSpec) -> None:
    previous = directory.manifest().get("spec")
    if previous is not None and previous != json.loads(json.dumps(spec.to_dict(), default=str)):
        raise ValueError(f"{directory.path} holds a campaign of another spec; choose a new directory")


def run_campaign(spec: CampaignSpec, out_dir: str | Path, address: str | None = None, workers: int | None = None,
                 backend: str = "ray", progress: bool = True) -> pd.DataFrame:
    """Run (or continue) the campaign into out_dir; returns the per-target summary.
    backend "local" runs the same chunks in this process, one at a time (the reference)."""
    directory = CampaignDir(Path(out_dir))
    directory.path.mkdir(parents=True, exist_ok=True)
    check_same_campaign(directory, spec)
    plan = ChunkPlan(spec, directory.valid_counts())
    total = spec.samples_per_target * len(spec.targets())
    started = time.time()
    counts = {"valid": 0, "hit": 0}
    bar = tqdm(total=total, initial=total - plan.remaining_samples(), unit="sample", disable=not progress,
               desc="campaign")
    manifest = {"format": "crystallm-campaign/1", "spec": spec.to_dict(), "versions": package_versions(),
                "status": "running"}

    def commit(item: WorkItem, candidates: list[Candidate], unavailable: dict) -> None:
        frame = chunk_frame(item, candidates)
        directory.write_chunk(item, frame)
        counts["valid"] += int(frame["valid"].sum())
        counts["hit"] += int(frame["hit"].fillna(False).astype(bool).sum())
        bar.total = bar.n + len(frame) + plan.remaining_samples()  # targets that reached their valid count end early
        bar.update(len(frame))
        bar.set_postfix(valid=counts["valid"], hits=counts["hit"],
                        rate=f"{bar.n / max(time.time() - started, 1e-9) * 60:.0f}/min")
        manifest["scores_unavailable"] = unavailable

    run = run_with_ray if backend == "ray" else run_locally
    manifest["model"] = run(spec, plan, commit, address, workers, lambda record: directory.write_manifest(
        {**manifest, "model": record}))
    bar.close()
    manifest.update(status="done", chunks=len(directory.done()))
    directory.write_manifest(manifest)
    summary = summarise_targets(directory.rows(), spec)
    summary.to_csv(directory.path / "summary.csv", index=False)
    top_candidates(directory.rows(), best_of=spec.best_of).to_csv(directory.path / "top.csv", index=False)
    return summary


def sampled(plan: ChunkPlan, item: WorkItem, candidates: list[Candidate]) -> list[tuple[WorkItem, list[Candidate]]]:
    """The chunks to score and keep now that `item` was sampled (see ChunkPlan.finished)."""
    return plan.finished(item, sum(c.valid for c in candidates), (item, candidates))


def run_locally(spec, plan, commit, address, workers, on_model) -> dict:
    sampler, scorer = Sampler(spec), Scorer(spec.scores) if any(spec.scores.values()) else None
    on_model(sampler.model_record())
    while (item := plan.next_item()) is not None:
        for kept, candidates in sampled(plan, *sampler.run(item)):
            commit(*(scorer.run(kept, candidates) if scorer else (kept, candidates, {})))
    return sampler.model_record()


def run_with_ray(spec, plan, commit, address, workers, on_model) -> dict:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": os.cpu_count()}))
    cpus = int(ray.available_resources().get("CPU", 1))
    workers = workers or max(1, cpus - 1)
    threads = max(1, cpus // workers)
    sampler_actor = ray.remote(num_cpus=threads, max_restarts=2, max_task_retries=2)(Sampler)
    scorer_actor = ray.remote(num_cpus=0, max_restarts=2, max_task_retries=2)(Scorer)
    samplers = [sampler_actor.remote(spec, threads) for _ in range(workers)]
    scorers = [scorer_actor.remote(spec.scores) for _ in range(max(1, workers // 2))] \
        if any(spec.scores.values()) else []
    record = ray.get(samplers[0].model_record.remote())
    on_model(record)
    sampling, scoring, turn = {}, {}, 0

    def fill() -> None:
        """Keep IN_FLIGHT chunks queued per sampler while the plan has work."""
        for sampler in samplers:
            while sum(s is sampler for s in sampling.values()) < IN_FLIGHT:
                item = plan.next_item()
                if item is None:
                    return
                sampling[sampler.run.remote(item)] = sampler

    fill()
    while sampling or scoring:
        done, _ = ray.wait(list(sampling) + list(scoring), num_returns=1)
        future = done[0]
        if future in sampling:
            sampling.pop(future)
            for item, candidates in sampled(plan, *ray.get(future)):
                if scorers:
                    scoring[scorers[turn % len(scorers)].run.remote(item, candidates)] = True
                    turn += 1
                else:
                    commit(item, candidates, {})
            fill()
        else:
            scoring.pop(future)
            commit(*ray.get(future))
    return record


def summarise_targets(rows: pd.DataFrame, spec: CampaignSpec) -> pd.DataFrame:
    """Per target: samples, valid, valid ∧ unique, hit, stable, VSUN (rates over all samples)."""
    from crystallm_core.chem.judges.metrics import summarise, uniqueness_flags
    from crystallm_core.chem.judges.structure_info import parse_cif

    summaries = []
    for target in spec.targets():
        part = rows[rows["target"] == target.index].copy() if len(rows) else rows
        if not len(part):
            continue
        structures = [parse_cif(cif) if valid else None for cif, valid in zip(part["cif"], part["valid"])]
        part["unique"] = uniqueness_flags(structures, part["valid"].tolist())
        part["vsun"] = part["valid"] & part["unique"].fillna(False).astype(bool) & part["novel"].fillna(False) \
            .astype(bool) & part["stable"].fillna(False).astype(bool)
        rates = summarise(part, target.band_gap)
        summaries.append({"target": target.index, "band_gap": target.band_gap, "e_hull": target.e_hull,
                          "n": len(part), **{k: rates[k] for k in ("valid", "valid_unique", "hit", "stable", "vsun")}})
    return pd.DataFrame(summaries)


TOP_COLUMNS = ["target", "file", "formula", "space_group", "band_gap_target", "band_gap_pred", "band_gap_std",
               "p_metal", "e_hull_target", "e_hull_pred", "hit", "novel", "p_hit", "score", "picked_from"]


def top_candidates(rows: pd.DataFrame, k: int = 50, best_of: int = 1, tolerance: float | None = None) -> pd.DataFrame:
    """The ranking (`chem.judges.ranking`'s score; uniqueness is not judged across chunks): the k best
    valid rows of the campaign, or with best_of K > 1 per target the best ⌈samples / K⌉ whose gap
    reading is within the tolerance (fewer when fewer are: never padded with misses)."""
    if not len(rows):
        return rows
    tolerance = MetricSettings().hit_tolerance if tolerance is None else tolerance
    valid = rows[rows["valid"]].copy()
    valid[["p_hit", "score"]] = rank_scores(valid, RankingSettings(gap_tolerance=tolerance))[["p_hit", "score"]]
    sampled = rows.groupby("target").size()
    valid["picked_from"] = valid["target"].map(sampled)
    if best_of <= 1:
        return valid.loc[ranking_order(valid["score"])].head(k)[TOP_COLUMNS]
    parts = []
    for target, group in valid.groupby("target", sort=True):
        has_target = group["band_gap_target"].notna().any()
        eligible = group["hit"].fillna(False).astype(bool) if has_target else pd.Series(True, index=group.index)
        picked = pick_best(group["score"], math.ceil(sampled[target] / best_of), eligible)
        parts.append(group.loc[[i for i in ranking_order(group["score"]) if picked[i]]])
    return pd.concat(parts)[TOP_COLUMNS] if parts else valid.head(0)[TOP_COLUMNS]


def campaign_status(out_dir: str | Path) -> str:
    """Samples, valid, hits and chunks done so far, from disk (for `campaign status DIR`)."""
    directory = CampaignDir(Path(out_dir))
    manifest = directory.manifest()
    if not manifest:
        raise ValueError(f"{out_dir} holds no campaign")
    rows = directory.rows()
    spec = manifest["spec"]
    n_targets = len(spec["targets"]["band_gap"]) * len(spec["targets"]["e_hull"])
    total = spec["samples_per_target"] * n_targets
    hits = int(rows["hit"].fillna(False).astype(bool).sum()) if len(rows) else 0
    valid = int(rows["valid"].sum()) if len(rows) else 0
    stop = f"; each target stops at {spec['valid_per_target']} valid" if spec.get("valid_per_target") else ""
    return (f"{manifest.get('status', '?')}: {len(rows)}/{total} samples in {len(directory.done())} chunks, "
            f"{valid} valid, {hits} hits ({n_targets} targets{stop})")


def campaign_run(out_dir: str | Path) -> Run:
    """A campaign's rows as one Run (kind "campaign"), for the app's Evaluate page: the checks and
    scores as stored (nothing is sampled or scored again), valid structures parsed for matching."""
    directory = CampaignDir(Path(out_dir))
    manifest = directory.manifest()
    if not manifest:
        raise ValueError(f"{out_dir} holds no campaign ({MANIFEST} missing or unreadable)")
    rows = directory.rows()
    run = Run(kind="campaign", model=manifest.get("model"), requests=[], settings={"campaign": str(out_dir)},
              status=manifest.get("status", "done"))
    for index, row in enumerate(rows.to_dict("records")):
        valid = bool(row["valid"])
        failed = [part.partition(": ") for part in (row.get("reason") or "").split("; ") if part]
        checks = [CheckResult(name, False, reason) for name, _, reason in failed] or [CheckResult("stored", valid, "")]
        report = ValidityReport(checks, formula=row.get("formula"), spacegroup=row.get("space_group"))
        structure = None
        if valid and row.get("cif"):
            try:
                structure = parse_cif(row["cif"])
            except ValueError:
                pass  # stays unmatched: counted as not unique, never fatal
        run.candidates.append(Candidate(index, Path(row["file"]).stem, row.get("cif"), report, structure,
                                        band_gap_target=row.get("band_gap_target"),
                                        e_hull_target=row.get("e_hull_target"), scores=Scores.from_dict(row),
                                        seconds=row.get("seconds"), stop_reason=row.get("stop_reason")))
    return run
