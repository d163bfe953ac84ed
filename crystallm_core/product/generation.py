"""One generation request: targets + prompt + settings → checked candidates, streamed into a Run.

`prepare` validates a request against the model (cheap, before anything queues).
`generate` streams: every sample is decoded, repaired and validity-checked (in the isolated
checker) as soon as the sampler finishes it, becomes a `Candidate` of the run and is handed to
`on_candidate`; a failure in one sample becomes its reason and never stops the batch.
Scoring (surrogate gap, CHGNet, novelty) is `scoring_service.score_candidate`'s job.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from crystallm_core.chem.decoding.constraints import CifConstraint, CifTokens, PromptMismatch
from crystallm_core.chem.judges.isolation import CHECKER, check_sample
from crystallm_core.chem.cif.prompts import (
    build_prompt,
    element_token_ids,
    parse_composition,
)
from crystallm_core.chem.decoding.repair import relax, rescale
from crystallm_core.lm.checkpoints import LoadedModel
from crystallm_core.lm.conditions import condition_vector
from crystallm_core.lm.sampler import (
    DEFAULT_BANNED_IDS,
    FinishedSample,
    SamplingSettings,
    batch_size_of,
    linear_layers,
    sample,
    warm_up,
)
from crystallm_core.product.run import Candidate, Run, candidate_name
from crystallm_core.product.server_settings import (
    DEFAULT_MAX_STRUCTURES,
    server_settings,
)

log = logging.getLogger(__name__)

MAX_STRUCTURES = DEFAULT_MAX_STRUCTURES  # the default limit; a server may set another (server_settings)
UNTIL_VALID_SAMPLE_FACTOR = 4  # "until N valid" draws at most this many times N samples


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
    rescale: bool = False  # repair: rescale the cell of a sample that fails only on bond lengths
    relax: bool = False  # repair: relax valid (and bond-only) samples with CHGNet, E_hull before/after
    # Best N of K (`best_of`): keep the best this many of the n samples; with relax, only those are
    # relaxed (together). None = keep every sample.
    keep_best: int | None = None

    def validate(self) -> None:
        limit = server_settings().max_structures
        if not (1 <= int(self.n) <= limit):
            raise ValueError(f"number of structures must be between 1 and {limit}, got {self.n}"
                             + (" (best-of-K draws N × K samples)" if self.keep_best else ""))
        if self.keep_best is not None:
            if not 1 <= int(self.keep_best) <= self.n:
                raise ValueError(f"the number of structures to keep must be between 1 and the number of samples "
                                 f"({self.n}), got {self.keep_best}")
            if self.stop_after_valid is not None:
                raise ValueError("best-of-K and 'count valid ones only' cannot be combined: choose one")
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
    return {"n": min(server_settings().max_structures, max_samples or UNTIL_VALID_SAMPLE_FACTOR * n), "stop_after_valid": n}


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
        factory = lambda: CifConstraint(tokens, background=True)  # noqa: E731
        try:
            factory().start(prompt_ids)  # a prompt the grammar refuses is the user's to fix, before sampling
        except PromptMismatch as error:
            raise ValueError(f"constrained decoding cannot complete this prompt: {error} "
                             f"(try another space group or Z, or free decoding)") from None
    return PreparedRequest(prompt.text, prompt_ids, values, present, DEFAULT_BANNED_IDS + tuple(banned_elements),
                           factory)


def repairs_of(candidate: Candidate, request: GenerationRequest) -> list[dict]:
    """The optional repairs the request asks for, each recorded beside the model's own CIF."""
    if candidate.structure is None:
        return []
    relax_now = request.relax and not request.keep_best  # best-of-K relaxes its picks together at the end
    done = [repair(candidate.structure, candidate.report)
            for wanted, repair in ((request.rescale, rescale), (relax_now, relax)) if wanted]
    return [r.to_dict() for r in done if r is not None]


def model_record(loaded: LoadedModel) -> dict:
    """What a run records of its model: id, source, weights hash, size, dtype, and how its products
    ran (int8 layers round differently from fp32: part of what reproduces a run)."""
    info = loaded.info
    return {"name": info.name, "source": info.source, "weights_sha256": info.weights_sha256,
            "n_params": info.n_params, "dtype": info.dtype, "linear_layers": linear_layers(loaded.model)}


def new_run(loaded: LoadedModel, requests: list[GenerationRequest], kind: str = "generate",
            settings: dict | None = None) -> Run:
    return Run(kind=kind, model=model_record(loaded), requests=[asdict(r) for r in requests],
               settings=dict(settings or {}), status="running")


def generate(
    loaded: LoadedModel,
    request: GenerationRequest,
    run: Run | None = None,
    on_candidate: Callable[[Candidate], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    head_start: int = 0,
) -> Run:
    """Sample `request.n` structures into `run` (a new one by default) and check each as it finishes.
    `head_start`: slots that run alone until the first sample ends (the sampler's), for a user
    who waits on the first structure.

    With `request.stop_after_valid`, sampling stops once that many of this request's samples are
    valid; samples still in flight then are dropped, so every candidate was finished. Candidates
    are numbered run-wide, so several requests (a sweep) can fill one run.
    """
    prepared = prepare(loaded, request)
    own_run = run is None
    run = new_run(loaded, [request]) if own_run else run
    context = loaded.model.config.max_cif_tokens
    max_tokens = min(request.settings.max_tokens or context, context)  # as the sampler caps it
    first = len(run.candidates)
    mine: list[Candidate] = []

    def target_reached() -> bool:
        wanted = request.stop_after_valid
        return wanted is not None and sum(c.valid for c in mine) >= wanted

    def stop() -> bool:
        return target_reached() or (should_cancel is not None and should_cancel())

    def finished(done: FinishedSample) -> None:
        text = loaded.tokenizer.decode(done.token_ids, skip_special_tokens=False)
        cif, report = check_sample(text, done.stop_reason, max_tokens, done.note)
        index = first + len(mine)
        candidate = Candidate(index, candidate_name(index, report.formula), cif, report, report.structure, text,
                              request.band_gap, request.e_hull, seconds=done.seconds, n_tokens=len(done.token_ids),
                              stop_reason=done.stop_reason, retries=done.retries)
        candidate.repairs = repairs_of(candidate, request)
        mine.append(candidate)
        run.candidates.append(candidate)
        if on_candidate is not None:
            on_candidate(candidate)

    started = time.perf_counter()
    sample(loaded.model, prepared.prompt_ids, prepared.conditions, prepared.present, request.n, request.settings,
           request.seed, eos_id=loaded.tokenizer.eos_id, banned_ids=prepared.banned_ids, on_finished=finished,
           should_cancel=stop, constraint_factory=prepared.constraint_factory, head_start=head_start)
    cancelled = len(mine) < request.n and not target_reached()
    record = {"prompt": prepared.prompt_text, "seed": request.seed, "n_requested": request.n, "n_finished": len(mine),
              "n_valid": sum(c.valid for c in mine), "n_valid_after_repair": sum(c.valid_after_repair for c in mine),
              "cancelled": cancelled, "batch_size": batch_size_of(request.settings),
              "wall_seconds": round(time.perf_counter() - started, 2)}
    if request.settings.decoding == "constrained":
        record["rewinds"] = {level: sum((c.retries or {}).get(level, 0) for c in mine)
                             for level in ("row", "cell", "restart")}
    run.generation.append(record)
    if own_run:
        run.status = "cancelled" if cancelled else "done"
    return run


def prepare_for_requests(loaded: LoadedModel) -> dict:
    """Everything a first request would otherwise wait for, done before a user asks: the sampler's
    warm-up (kernel build, weight packing, thread choice), the isolated checker's process, and one
    small constrained request, which runs the paths jump-forward spans take (measured: the first
    structure of the app's default request came after 9.7 s cold, 2.0-2.5 s prepared, before the
    native kernel; scripts/bench_sampler.py prints today's figure).
    Returns the warm-up figures and the seconds it all took."""
    started = time.perf_counter()
    figures = warm_up(loaded.model)
    CHECKER.ensure_started()
    try:
        generate(loaded, GenerationRequest(n=2, seed=0, settings=SamplingSettings(batch_size=2)))
    except ValueError as error:  # a model the default request does not suit: its requests will say why
        log.warning("no warm-up request for this model: %s", error)
    return {**figures, "seconds": round(time.perf_counter() - started, 2)}
