"""One generation run: targets + prompt + settings → checked structures, a manifest, files.

`generate` streams: every structure is decoded, repaired and validity-checked as soon as
the sampler finishes it, then handed to `on_structure`; a failure in one structure becomes
its reason and never stops the batch. `write_run` produces what the CLI and the app's zip
share: one CIF per sample, `summary.csv` and `manifest.json`.
"""
from __future__ import annotations

import csv
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

from crystallm_core.chem.constraints import CifConstraint, CifTokens, PromptMismatch
from crystallm_core.chem.isolation import check_sample
from crystallm_core.chem.prompts import (
    build_prompt,
    element_token_ids,
    parse_composition,
)
from crystallm_core.chem.validity import ValidityReport
from crystallm_core.lm.checkpoints import LoadedModel
from crystallm_core.lm.conditions import condition_vector
from crystallm_core.lm.sampler import (
    DEFAULT_BANNED_IDS,
    FinishedSample,
    SamplingSettings,
    sample,
)

MAX_STRUCTURES = 256
UNTIL_VALID_SAMPLE_FACTOR = 4  # "until N valid" draws at most this many times N samples
VERSIONED_PACKAGES = ("torch", "transformers", "pymatgen", "numpy", "safetensors", "chgnet", "lightgbm", "streamlit")


@dataclass
class GenerationRequest:
    band_gap: float | None = 1.5  # eV; None = unknown/any
    e_hull: float | None = 0.0  # eV/atom; None = unknown/any
    n: int = 16
    composition: str | None = None
    z: int | None = None
    spacegroup: str | None = None
    elements: list[str] | None = None  # only these elements may be written (None = any)
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    seed: int = 0
    # Stop as soon as this many samples are valid (n is then the most samples drawn); None = draw all n.
    stop_after_valid: int | None = None

    def validate(self) -> None:
        if not (1 <= int(self.n) <= MAX_STRUCTURES):
            raise ValueError(f"number of structures must be between 1 and {MAX_STRUCTURES}, got {self.n}")
        if self.stop_after_valid is not None and not (1 <= int(self.stop_after_valid) <= self.n):
            raise ValueError(f"the number of valid structures to stop at must be between 1 and the number of "
                             f"samples ({self.n}), got {self.stop_after_valid}")
        self.settings.validate()
        condition_vector(self.band_gap, self.e_hull)  # raises on NaN / negative / out of range


def sample_counts(n: int, until_valid: bool = False, max_samples: int | None = None) -> dict:
    """`n` and `stop_after_valid` for a request of n structures, or (until_valid) of n VALID ones
    drawn from at most `max_samples` samples (default 4 × n, at most 256)."""
    if not until_valid:
        return {"n": n, "stop_after_valid": None}
    return {"n": min(MAX_STRUCTURES, max_samples or UNTIL_VALID_SAMPLE_FACTOR * n), "stop_after_valid": n}


def structure_file_stem(index: int, formula: str | None) -> str:
    """How a run names a structure's files: zero-padded index and formula."""
    return f"{index:03d}_{formula or 'unparsed'}"


@dataclass
class GeneratedStructure:
    index: int
    raw_text: str  # what the model wrote (decoded, brackets kept)
    cif: str | None  # the repaired, parseable CIF, or None when it could not be repaired
    report: ValidityReport
    seconds: float
    n_tokens: int
    stop_reason: str
    retries: dict | None = None  # constrained decoding's rewinds (row / cell / restart, and why)

    @property
    def valid(self) -> bool:
        return self.report.valid

    @property
    def formula(self) -> str | None:
        return self.report.formula

    @property
    def spacegroup(self) -> str | None:
        return self.report.spacegroup

    @property
    def reasons(self) -> list[str]:
        return self.report.failed_reasons

    def file_stem(self) -> str:
        return structure_file_stem(self.index, self.formula)


@dataclass
class GenerationRun:
    structures: list[GeneratedStructure]
    manifest: dict
    cancelled: bool = False


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages a run depends on, for manifests."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_manifest(loaded: LoadedModel, request: GenerationRequest, prompt_text: str) -> dict:
    """Everything needed to reproduce a run (model id + hash, targets, settings, seed, versions)."""
    info = loaded.info
    return {
        "tool": "CrystaLLM Studio",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": info.name, "source": info.source, "weights_sha256": info.weights_sha256,
                  "n_params": info.n_params, "dtype": info.dtype},
        "targets": {"band_gap": request.band_gap, "e_hull": request.e_hull},
        "prompt": {"composition": request.composition, "z": request.z, "spacegroup": request.spacegroup,
                   "elements": request.elements, "text": prompt_text},
        "sampling": asdict(request.settings),
        "n_requested": request.n,
        "stop_after_valid": request.stop_after_valid,
        "seed": request.seed,
        "versions": package_versions(),
    }


@dataclass
class PreparedRequest:
    """A validated request in the sampler's terms."""

    prompt_text: str
    prompt_ids: list[int]
    conditions: list[float]
    present: list[bool]
    banned_ids: tuple[int, ...]
    constraint_factory: Callable[[], CifConstraint] | None  # None with free decoding


def prepare(loaded: LoadedModel, request: GenerationRequest) -> PreparedRequest:
    """Validate a request against the model; raises ValueError with a clear reason (cheap: no sampling)."""
    request.validate()
    if not loaded.info.supports_missing_properties and (request.band_gap is None or request.e_hull is None):
        raise ValueError("this model needs both targets (band gap and E_hull); it cannot leave one out")
    prompt = build_prompt(loaded.tokenizer, request.composition, request.z, request.spacegroup)
    banned_elements = element_token_ids(loaded.tokenizer, request.elements)
    if request.elements and prompt.formula:
        outside = sorted({el.symbol for el in parse_composition(prompt.formula)} - set(request.elements))
        if outside:
            raise ValueError(f"the composition uses {', '.join(outside)}, which the element set excludes")
    values, present = condition_vector(request.band_gap, request.e_hull)
    prompt_ids = loaded.tokenizer.encode(prompt.text)
    factory = None
    if request.settings.decoding == "constrained":
        tokens = CifTokens(loaded.tokenizer, request.elements)
        factory = lambda: CifConstraint(tokens)  # noqa: E731
        try:
            factory().start(prompt_ids)  # a prompt the grammar refuses is the user's to fix, before sampling
        except PromptMismatch as error:
            raise ValueError(f"constrained decoding cannot complete this prompt: {error} "
                             f"(try another space group or Z, or free decoding)") from None
    return PreparedRequest(prompt.text, prompt_ids, values, present, DEFAULT_BANNED_IDS + tuple(banned_elements),
                           factory)


def generate(
    loaded: LoadedModel,
    request: GenerationRequest,
    on_structure: Callable[[GeneratedStructure], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> GenerationRun:
    """Sample `request.n` structures and check each one as soon as it is finished.

    With `request.stop_after_valid`, sampling stops once that many are valid; samples still
    in flight then are dropped, so every returned structure was finished.
    """
    prepared = prepare(loaded, request)
    manifest = build_manifest(loaded, request, prepared.prompt_text)
    context = loaded.model.config.max_cif_tokens
    max_tokens = min(request.settings.max_tokens or context, context)  # as the sampler caps it
    structures: list[GeneratedStructure] = []

    def target_reached() -> bool:
        wanted = request.stop_after_valid
        return wanted is not None and sum(s.valid for s in structures) >= wanted

    def stop() -> bool:
        return target_reached() or (should_cancel is not None and should_cancel())

    def finished(done: FinishedSample) -> None:
        text = loaded.tokenizer.decode(done.token_ids, skip_special_tokens=False)
        cif, report = check_sample(text, done.stop_reason, max_tokens, done.note)
        structure = GeneratedStructure(done.index, text, cif, report, done.seconds, len(done.token_ids),
                                       done.stop_reason, done.retries)
        structures.append(structure)
        if on_structure is not None:
            on_structure(structure)

    started = time.perf_counter()
    sample(loaded.model, prepared.prompt_ids, prepared.conditions, prepared.present, request.n, request.settings,
           request.seed, eos_id=loaded.tokenizer.eos_id, banned_ids=prepared.banned_ids, on_finished=finished,
           should_cancel=stop, constraint_factory=prepared.constraint_factory)
    structures.sort(key=lambda s: s.index)
    cancelled = len(structures) < request.n and not target_reached()
    manifest.update({"n_finished": len(structures), "n_valid": sum(s.valid for s in structures),
                     "cancelled": cancelled, "wall_seconds": round(time.perf_counter() - started, 2)})
    if request.settings.decoding == "constrained":
        manifest["rewinds"] = {level: sum((s.retries or {}).get(level, 0) for s in structures)
                               for level in ("row", "cell", "restart")}
    return GenerationRun(structures, manifest, cancelled)


def summary_rows(structures: list[GeneratedStructure]) -> list[dict]:
    """One summary.csv row per structure."""
    return [
        {"index": s.index, "file": s.file_stem() + ".cif", "formula": s.formula or "", "spacegroup": s.spacegroup or "",
         "valid": s.valid, "failed_checks": "; ".join(s.reasons), "n_tokens": s.n_tokens,
         "seconds": round(s.seconds, 3), "stop_reason": s.stop_reason,
         "rewinds": sum(s.retries[k] for k in ("row", "cell", "restart")) if s.retries else ""}
        for s in structures
    ]


def check_run_dir(out_dir: str | Path) -> Path:
    """A run directory must not hold another run's CIFs (evaluate would score them against this manifest)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.glob("*.cif")):
        raise ValueError(f"{out_dir} already holds CIF files from another run; choose a new directory")
    return out_dir


def write_run(run: GenerationRun, out_dir: str | Path) -> Path:
    """One CIF per sample (the repaired CIF, or the raw text if unrepairable), summary.csv, manifest.json."""
    out_dir = check_run_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in run.structures:
        (out_dir / (s.file_stem() + ".cif")).write_text(s.cif if s.cif is not None else s.raw_text)
    rows = summary_rows(run.structures)
    with (out_dir / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["index"])
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "manifest.json").write_text(json.dumps(run.manifest, indent=2))
    return out_dir
