"""A screening campaign's specification: targets, samples, settings, scores, model; and its work items.

    [targets]
    band_gap = {start = 0.5, stop = 4.0, step = 0.25}   # or a list: [0.5, 1.0, 2.0]
    e_hull = [0.0]                                       # every band gap × every E_hull
    composition = "TiO2"                                  # optional prompt: composition / z /
    elements = ["Li", "Fe", "P", "O"]                     #   spacegroup / element set
    [sampling]                                            # SamplingSettings fields (decoding too)
    temperature = 0.7
    [scores]
    surrogate = true
    stability = true
    relax = false
    novelty = true
    samples_per_target = 10000                            # or, with valid_per_target, the cap
    valid_per_target = 500                                # optional: stop a target at this many valid
    best_of = 4                                           # optional: top.csv keeps per target the best
                                                          #   samples / best_of within tolerance
    chunk_size = 64
    seed = 1
    model = "path/to/model"                               # optional: the shipped model by default

The work is cut into chunks (target × chunk index), each with its own seed derived from the
campaign seed, target and chunk: the rows do not depend on how many workers ran or in what order.
"""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from crystallm_core.lm.conditions import condition_vector
from crystallm_core.lm.sampler import SamplingSettings
from crystallm_core.product.generation import GenerationRequest

TOP_KEYS = {"targets", "sampling", "scores", "samples_per_target", "valid_per_target", "chunk_size", "seed", "model",
            "best_of"}
TARGET_KEYS = {"band_gap", "e_hull", "composition", "z", "spacegroup", "elements"}
SCORE_KEYS = {"surrogate", "stability", "relax", "novelty"}
MAX_GRID = 10_000  # targets in one campaign


@dataclass(frozen=True)
class Target:
    index: int
    band_gap: float | None
    e_hull: float | None


@dataclass(frozen=True)
class WorkItem:
    target: Target
    chunk: int
    n: int
    seed: int

    @property
    def key(self) -> str:
        return f"t{self.target.index:04d}_c{self.chunk:05d}"


@dataclass
class CampaignSpec:
    band_gaps: list[float | None]
    e_hulls: list[float | None]
    samples_per_target: int
    chunk_size: int = 64
    seed: int = 0
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    scores: dict = field(default_factory=lambda: {"surrogate": True, "stability": True, "relax": False,
                                                  "novelty": True})
    prompt: dict = field(default_factory=dict)  # composition, z, spacegroup, elements
    model: str | None = None
    valid_per_target: int | None = None  # stop a target at this many valid samples (campaign_plan)
    best_of: int = 1  # top.csv: per target, the best samples / best_of (1: the campaign's best 50)

    def targets(self) -> list[Target]:
        grid = [(g, e) for g in self.band_gaps for e in self.e_hulls]
        return [Target(i, g, e) for i, (g, e) in enumerate(grid)]

    def request(self, item: WorkItem) -> GenerationRequest:
        return GenerationRequest(band_gap=item.target.band_gap, e_hull=item.target.e_hull, n=item.n,
                                 settings=self.sampling, seed=item.seed, **self.prompt)

    def work_items(self) -> list[WorkItem]:
        items = []
        for target in self.targets():
            for chunk, start in enumerate(range(0, self.samples_per_target, self.chunk_size)):
                n = min(self.chunk_size, self.samples_per_target - start)
                items.append(WorkItem(target, chunk, n, chunk_seed(self.seed, target.index, chunk)))
        return items

    def to_dict(self) -> dict:
        stop = {} if self.valid_per_target is None else {"valid_per_target": self.valid_per_target}
        if self.best_of != 1:  # absent by default, so a campaign begun before the option resumes
            stop["best_of"] = self.best_of
        return {"targets": {"band_gap": self.band_gaps, "e_hull": self.e_hulls, **self.prompt},
                "sampling": asdict(self.sampling), "scores": dict(self.scores),
                "samples_per_target": self.samples_per_target, **stop, "chunk_size": self.chunk_size,
                "seed": self.seed, "model": self.model}


def chunk_seed(seed: int, target: int, chunk: int) -> int:
    """A seed per chunk, independent of every other chunk's."""
    return int(np.random.SeedSequence([seed, target, chunk]).generate_state(1)[0] % 2**31)


def axis(value, name: str) -> list[float | None]:
    """A list of values, or {start, stop, step} (stop included), or one value ('none' = unknown)."""
    if isinstance(value, dict):
        unknown = set(value) - {"start", "stop", "step"}
        if unknown or not {"start", "stop", "step"} <= set(value):
            raise ValueError(f"targets.{name} as a range needs exactly start, stop and step")
        start, stop, step = (float(value[k]) for k in ("start", "stop", "step"))
        if not step > 0 or stop < start:
            raise ValueError(f"targets.{name}: step must be > 0 and stop ≥ start")
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        if count > MAX_GRID:
            raise ValueError(f"targets.{name}: {count} values is more than {MAX_GRID}")
        return [round(start + i * step, 6) for i in range(count)]
    values = value if isinstance(value, list) else [value]
    parsed = [None if v is None or (isinstance(v, str) and v.lower() == "none") else float(v) for v in values]
    if not parsed:
        raise ValueError(f"targets.{name} is empty")
    return parsed


def parse_spec(data: dict) -> CampaignSpec:
    """A validated spec from a parsed TOML/JSON document; ValueError says what is wrong, in one line."""
    def unknown(keys, allowed, where):
        extra = sorted(set(keys) - allowed)
        if extra:
            raise ValueError(f"unknown key{'s' if len(extra) > 1 else ''} in {where}: {', '.join(extra)}")

    unknown(data, TOP_KEYS, "the spec")
    targets = data.get("targets")
    if not isinstance(targets, dict) or "band_gap" not in targets:
        raise ValueError("the spec needs a [targets] table with band_gap")
    unknown(targets, TARGET_KEYS, "[targets]")
    scores = {"surrogate": True, "stability": True, "relax": False, "novelty": True, **data.get("scores", {})}
    unknown(scores, SCORE_KEYS, "[scores]")
    sampling = data.get("sampling", {})
    unknown(sampling, {f.name for f in fields(SamplingSettings)}, "[sampling]")
    if "samples_per_target" not in data:
        raise ValueError("the spec needs samples_per_target")
    spec = CampaignSpec(
        band_gaps=axis(targets["band_gap"], "band_gap"), e_hulls=axis(targets.get("e_hull", [0.0]), "e_hull"),
        samples_per_target=int(data["samples_per_target"]), chunk_size=int(data.get("chunk_size", 64)),
        seed=int(data.get("seed", 0)), sampling=SamplingSettings(**sampling), scores=scores,
        prompt={k: targets[k] for k in ("composition", "z", "spacegroup", "elements") if k in targets},
        model=data.get("model"),
        valid_per_target=int(data["valid_per_target"]) if data.get("valid_per_target") is not None else None,
        best_of=int(data.get("best_of", 1)))
    if not 1 <= spec.best_of <= 1000:
        raise ValueError(f"best_of must be between 1 and 1000, got {spec.best_of}")
    if not 1 <= spec.samples_per_target <= 10_000_000:
        raise ValueError(f"samples_per_target must be between 1 and 10,000,000, got {spec.samples_per_target}")
    if spec.valid_per_target is not None and not 1 <= spec.valid_per_target <= spec.samples_per_target:
        raise ValueError(f"valid_per_target must be between 1 and samples_per_target ({spec.samples_per_target}), "
                         f"got {spec.valid_per_target}")
    if not 1 <= spec.chunk_size <= 256:
        raise ValueError(f"chunk_size must be between 1 and 256, got {spec.chunk_size}")
    if len(spec.band_gaps) * len(spec.e_hulls) > MAX_GRID:
        raise ValueError(f"{len(spec.band_gaps) * len(spec.e_hulls)} targets is more than {MAX_GRID}")
    spec.sampling.validate()
    for gap in spec.band_gaps:
        for e_hull in spec.e_hulls:
            condition_vector(gap, e_hull)  # out-of-range targets: the conditions module's message
    return spec


def load_spec(path: str | Path) -> CampaignSpec:
    """Read SPEC.toml or SPEC.json."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {error}") \
            from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a table of settings")
    return parse_spec(data)
