"""The logic behind the Streamlit app, kept out of the pages so it is testable without a browser.

- `GenerationQueue`: one generation at a time per process. Several users on one CPU would
  otherwise thrash each other; with the queue each waits its turn and sees its position.
- `GenerationJob`: a run (or a target sweep) in a background thread. The page polls it
  (`st.fragment(run_every=…)`) for progress and finished rows; Cancel sets an event that the
  sampler checks between steps, so everything finished so far is kept. A job nobody has polled
  for ABANDON_SECONDS (its browser tab was closed) cancels itself so it frees the queue. The thread touches no
  Streamlit API, and each browser session holds its own job, so sessions never mix.
- Each finished structure is scored by `scoring.StructureScorer` (surrogate band gap, CHGNet
  E_hull, novelty) as it arrives; a score whose model is unavailable is left out, never invented.
- `results_frame`, `run_zip`, `run_manifest`: the results table and the download.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import threading
import time
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import pandas as pd

from crystallm_core.chem.metrics import (
    MetricSettings,
    add_flags,
    hit_rate_curve,
    summarise,
    uniqueness_flags,
)
from crystallm_core.chem.scoring import StructureScorer, default_scorer
from crystallm_core.chem.structure_info import parse_cif
from crystallm_core.product.generation import package_versions, structure_file_stem
from crystallm_core.product.history import HistoryStore, RunRecord, StructureRecord

LOG = logging.getLogger(__name__)
NAN = float("nan")
ABANDON_SECONDS = 120  # a job unpolled this long has lost its page (tab closed): stop it


class GenerationQueue:
    """FIFO of tickets; the ticket at the head may generate, the others wait and see their place."""

    def __init__(self):
        self._cond = threading.Condition()
        self._line: list[int] = []
        self._tickets = itertools.count(1)

    def join(self) -> int:
        with self._cond:
            ticket = next(self._tickets)
            self._line.append(ticket)
            return ticket

    def position(self, ticket: int) -> int | None:
        """0 = generating now, k = k runs ahead of it, None = not in the queue."""
        with self._cond:
            return self._line.index(ticket) if ticket in self._line else None

    def wait_turn(self, ticket: int, should_cancel: Callable[[], bool], poll_seconds: float = 0.2) -> bool:
        """Block until `ticket` is at the head (True) or `should_cancel()` (False)."""
        with self._cond:
            while self._line[0] != ticket:
                if should_cancel():
                    return False
                self._cond.wait(poll_seconds)
            return True

    def leave(self, ticket: int) -> None:
        with self._cond:
            if ticket in self._line:
                self._line.remove(ticket)
            self._cond.notify_all()


GENERATION_QUEUE = GenerationQueue()


@dataclass
class Progress:
    status: str  # queued | running | done | cancelled | failed
    done: int  # structures finished
    total: int  # the most structures the requests may draw
    valid: int
    valid_target: int | None  # with "until N valid" requests: how many valid ones are wanted in all
    fraction: float  # of the work, 0–1 (a request that stops at N valid is done at N valid)
    elapsed: float
    eta: float | None
    position: int | None  # place in the generation queue while queued


class GenerationJob:
    """One run of one or more `GenerationRequest`s in a background thread.

    `run` carries the model info and settings; structures are appended to it as they finish
    and it is saved to `store` (if given) when the job ends, however it ends.
    """

    def __init__(self, loaded_model, requests: Sequence, run: RunRecord, store: HistoryStore | None = None,
                 queue: GenerationQueue = GENERATION_QUEUE, scorer: Callable[[], StructureScorer] = default_scorer):
        self.loaded_model, self.requests, self.run = loaded_model, list(requests), run
        self.store, self.queue, self.scorer = store, queue, scorer
        self.total = sum(r.n for r in self.requests)
        targets = [r.stop_after_valid for r in self.requests]
        self.valid_target = sum(targets) if all(targets) else None
        self.requests_done = 0
        self.request_start = 0  # index in run.structures where the request being sampled begins
        self.status = "queued"
        self.ticket: int | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.unavailable: dict[str, str] = {}  # score families the scorer could not provide, and why
        self.last_polled = time.monotonic()  # progress() is the page's heartbeat
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name=f"generation-{run.run_id}", daemon=True)

    def start(self) -> GenerationJob:
        self.ticket = self.queue.join()
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def should_cancel(self) -> bool:
        """Cancel was pressed, or the page stopped polling (tab closed): either way, stop."""
        if time.monotonic() - self.last_polled > ABANDON_SECONDS:
            self._cancel.set()
        return self._cancel.is_set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def finished(self) -> bool:
        return self.status in ("done", "cancelled", "failed")

    def structures(self) -> list[StructureRecord]:
        with self._lock:
            return list(self.run.structures)

    def fraction_done(self) -> float:
        """Share of the work done, weighting each request by its most samples."""
        done = sum(r.n for r in self.requests[: self.requests_done])
        if self.requests_done < len(self.requests):
            request, current = self.requests[self.requests_done], self.run.structures[self.request_start:]
            part = len(current) / request.n
            if request.stop_after_valid:
                part = max(part, sum(s.valid for s in current) / request.stop_after_valid)
            done += min(part, 1.0) * request.n
        return done / self.total

    def progress(self) -> Progress:
        self.last_polled = time.monotonic()
        with self._lock:
            done, valid = len(self.run.structures), sum(s.valid for s in self.run.structures)
            fraction = self.fraction_done()
        end = self.finished_at or time.time()
        elapsed = end - self.started_at if self.started_at else 0.0
        eta = elapsed / fraction * (1 - fraction) if fraction and not self.finished else None
        position = self.queue.position(self.ticket) if self.status == "queued" else None
        return Progress(self.status, done, self.total, valid, self.valid_target, fraction, elapsed, eta, position)

    def _add(self, generated, request) -> None:
        """on_structure callback: score a valid structure, then publish its row."""
        scores = {}
        if generated.valid and generated.report.structure is not None:
            try:
                scorer = self.scorer()
                self.unavailable = scorer.unavailable
                scores = scorer.score([generated.report.structure])[0]
            except Exception as error:  # a scoring failure must not lose the structure
                scores = {"notes": f"scoring failed: {type(error).__name__}: {error}"}
        with self._lock:
            self.run.structures.append(StructureRecord(
                index=len(self.run.structures), valid=bool(generated.valid), formula=generated.formula,
                spacegroup=generated.spacegroup, reasons=list(generated.reasons), cif=generated.cif,
                raw_text=generated.raw_text, seconds=float(generated.seconds), band_gap_target=request.band_gap,
                e_hull_target=request.e_hull, scores=scores,
            ))

    def _work(self) -> None:
        from crystallm_core.product.generation import generate

        manifests, status = [], "cancelled"
        try:
            if self.queue.wait_turn(self.ticket, self.should_cancel):
                self.status, self.started_at = "running", time.time()
                for request in self.requests:
                    if self.should_cancel():
                        break
                    manifests.append(generate(self.loaded_model, request, should_cancel=self.should_cancel,
                                              on_structure=lambda g, r=request: self._add(g, r)).manifest)
                    with self._lock:
                        self.requests_done, self.request_start = self.requests_done + 1, len(self.run.structures)
                status = "cancelled" if self._cancel.is_set() else "done"
        except ValueError as error:  # bad request: the core's message is meant for the user
            status, self.run.error = "failed", str(error)
        except Exception as error:
            LOG.exception("generation job %s failed", self.run.run_id)
            status, self.run.error = "failed", f"generation failed ({type(error).__name__}: {error})"
        finally:
            try:
                self.queue.leave(self.ticket)
                self.run.status = status
                try:
                    self.run.manifest = run_manifest(self.run, manifests, self.unavailable)
                except Exception:
                    LOG.exception("could not build the manifest of run %s", self.run.run_id)
                if self.store is not None and self.run.structures:
                    try:
                        self.store.save(self.run)
                    except Exception:
                        LOG.exception("could not save run %s to the history", self.run.run_id)
            finally:  # always final, or the page would poll a dead thread forever
                self.finished_at = time.time()
                self.status = status  # last: from here on the UI treats the run as final


def run_manifest(run: RunRecord, generation_manifests: Sequence[dict], unavailable: dict[str, str]) -> dict:
    """What a download says about how it was made: model id + hash, settings, seeds, versions,
    and which scores could not be computed (so a missing number is never mistaken for zero)."""
    return {
        "run_id": run.run_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(run.created_at)),
        "kind": run.kind,
        "status": run.status,
        "error": run.error,
        "model": run.model,
        "settings": run.settings,
        "seed": run.settings.get("seed"),
        "generation": list(generation_manifests),
        "n_requested": run.settings.get("n"),
        "n_generated": len(run.structures),
        "n_valid": run.n_valid,
        "scores_unavailable": dict(unavailable),
        "versions": package_versions(),
    }


RESULT_COLUMNS = ["index", "formula", "space_group", "valid", "reason", "band_gap_target", "band_gap_pred",
                  "band_gap_std", "e_hull_target", "e_hull_pred", "unique", "novel", "stable", "hit", "vsun", "seconds"]


def results_frame(structures: Sequence[StructureRecord], settings: MetricSettings | None = None,
                  unique: Sequence[bool | None] | None = None) -> pd.DataFrame:
    """One row per structure with the metrics flags: the live table, the CSV in the zip, and the
    Evaluate page's input. `unique` (from `unique_flags`) is optional because it needs the whole run."""
    settings = settings or MetricSettings()
    frame = pd.DataFrame({
        "index": [s.index for s in structures],
        "formula": [s.formula for s in structures],
        "space_group": [s.spacegroup for s in structures],
        "valid": [s.valid for s in structures],
        "reason": ["; ".join(s.reasons) for s in structures],
        "band_gap_target": pd.array([s.band_gap_target for s in structures], dtype="Float64"),
        "band_gap_pred": [s.scores.get("band_gap_pred", NAN) for s in structures],
        "band_gap_std": [s.scores.get("band_gap_std", NAN) for s in structures],
        "e_hull_target": [s.e_hull_target for s in structures],
        "e_hull_pred": [s.scores.get("e_hull_pred", NAN) for s in structures],
        "unique": list(unique) if unique is not None else [None] * len(structures),
        "novel": [s.scores.get("novel") for s in structures],
        "seconds": [round(s.seconds, 3) for s in structures],
    })
    if frame.empty:
        return frame.reindex(columns=RESULT_COLUMNS)
    # Hit needs each structure's own target (a sweep has several): flag per target group.
    parts = [add_flags(group, None if pd.isna(target) else float(target), settings)
             for target, group in frame.groupby("band_gap_target", dropna=False, sort=False)]
    return pd.concat(parts).sort_index()[RESULT_COLUMNS]


def unique_flags(structures: Sequence[StructureRecord]) -> list[bool | None]:
    """Uniqueness within the run (valid structures first), via metrics.uniqueness_flags."""
    parsed = []
    for record in structures:
        try:
            parsed.append(parse_cif(record.cif) if record.valid and record.cif else None)
        except ValueError:
            parsed.append(None)
    return uniqueness_flags(parsed, [s.valid for s in structures])


def hit_rate_vs_tolerance(frame: pd.DataFrame, tolerances: Sequence[float]) -> pd.DataFrame:
    """Hit rate over all samples as the tolerance grows (targets may differ per structure)."""
    hits = pd.Series(0.0, index=range(len(tolerances)))
    for target, group in frame.dropna(subset=["band_gap_target"]).groupby("band_gap_target"):
        curve = hit_rate_curve(group["band_gap_pred"].tolist(), group["valid"].tolist(), float(target), tolerances)
        hits += curve["hit_rate"] * len(group)
    return pd.DataFrame({"tolerance": list(tolerances), "hit_rate": hits / max(len(frame), 1)})


def sweep_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per band-gap target: samples, valid and hit rates (over all samples), mean predicted gap."""
    rows = []
    for target, group in frame.dropna(subset=["band_gap_target"]).groupby("band_gap_target"):
        rates = summarise(group, float(target))
        predicted = pd.to_numeric(group["band_gap_pred"], errors="coerce")
        rows.append({"target": float(target), "n": len(group), "valid": rates["valid"], "hit": rates["hit"],
                     "mean_pred": float(predicted.mean()) if predicted.notna().any() else NAN,
                     "std_pred": float(predicted.std()) if predicted.notna().sum() > 1 else NAN})
    return pd.DataFrame(rows, columns=["target", "n", "valid", "hit", "mean_pred", "std_pred"])


def cif_filename(record: StructureRecord) -> str:
    """The stored structure's CIF file name, as generation names run files."""
    return structure_file_stem(record.index, record.formula) + ".cif"


def run_zip(run: RunRecord, include_invalid: bool = False, tolerance: float | None = None) -> bytes:
    """cifs/ (one CIF per valid structure), optionally invalid/ (what was written, with its reason
    in the CSV), results.csv and manifest.json."""
    tolerance = run.settings.get("tolerance", 0.5) if tolerance is None else tolerance
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for record in run.structures:
            if record.valid and record.cif:
                archive.writestr(f"cifs/{cif_filename(record)}", record.cif)
            elif include_invalid:
                text = record.cif or record.raw_text
                archive.writestr(f"invalid/{cif_filename(record)}", text)
        frame = results_frame(run.structures, MetricSettings(hit_tolerance=tolerance), unique_flags(run.structures))
        archive.writestr("results.csv", frame.to_csv(index=False))
        archive.writestr("manifest.json", json.dumps(run.manifest, indent=2, default=str))
    return buffer.getvalue()


def stored_run_zip(store: HistoryStore, run_id: str) -> bytes:
    """`run_zip` of a stored run; a run deleted since the page was drawn gives a zip that says so
    (a download button builds its file in a later request, where an error would be a broken link)."""
    try:
        return run_zip(store.load(run_id))
    except KeyError:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("RUN_DELETED.txt", f"Run {run_id} was deleted from the history before this download.\n")
        return buffer.getvalue()


@lru_cache(maxsize=1)
def space_group_choices() -> list[tuple[int, str]]:
    """(number, short H-M symbol) for all 230 space groups, in the notation the model writes."""
    import spglib

    symbols: dict[int, str] = {}
    for hall_number in range(1, 531):  # the first Hall setting of each group is its standard one
        group = spglib.get_spacegroup_type(hall_number)
        symbols.setdefault(group.number, group.international_short)
    return sorted(symbols.items())
