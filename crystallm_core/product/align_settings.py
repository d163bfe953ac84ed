"""What an `align` run does: its settings, the learning signals it uses, and the target cells
its rounds sample (both sliders' grid, or a user's own target region)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from crystallm_core.chem.judges.reward import RewardSettings
from crystallm_core.chem.judges.stability import RelaxSettings

PAPER_BAND_GAPS = (0.072, 0.180, 0.681, 1.547, 2.440, 3.720, 6.776, 12.145)  # eV
E_HULL_TARGETS = (0.0, 0.1, 0.25, 0.5)  # eV/atom


@dataclass
class AlignSignals:
    """Which learning signals a round uses (each can be switched off for an ablation)."""

    hindsight: bool = True
    rejection: bool = True
    relaxed_teachers: bool = True
    replay: bool = True
    preference: bool = False  # DPO on best-vs-worst pairs of a cell against the frozen base model (`--with`)


@dataclass
class AlignSettings:
    rounds: int = 12
    minutes: float | None = None  # stop starting new rounds after this long
    # Every round samples the whole grid (45 cells: band gap × E_hull, "unknown" included), so rounds
    # compare: over 6 of them drawn at random, the base model's own stable rate read 4.2 % on round
    # 0's cells and 10.4 % on round 1's, its V∧U∧N 96.9 % and 91.7 %, and a run's guard stopped it
    # for a "fall" the base model showed too.
    cells_per_round: int = 45
    samples_per_cell: int = 2
    relax_per_round: int = 8  # valid samples relaxed (a random share: an unbiased relaxed E_hull too)
    relax: RelaxSettings = field(default_factory=lambda: RelaxSettings(max_steps=60, max_seconds=20.0))
    pairs_per_cell: int = 2  # preference pairs: the i-th best against the i-th worst of a cell …
    min_reward_gap: float = 0.2  # … when their rewards differ by at least this
    dpo_beta: float = 0.1  # DPO's β: how far from the base model the preferences may pull
    keep_best: float = 0.25  # rejection sampling keeps this fraction of each cell, best reward first
    min_reward: float = 0.3  # … and only samples at least this good
    replay_per_round: int = 32
    free_samples: int = 8  # free-decoding validity, reported each round
    learning_rate: float = 5e-5
    batch_size: int = 8
    condition_dropout: float = 0.15
    temperature: float = 0.7
    # Variety inside the reward, not only in the guard: a reward is divided by n^p, n the round's
    # valid samples of its prototype. Off by default until a run measures it; every run so far
    # (A–I) gained stability as repeats (VSUN flat while stable doubled).
    repeat_penalty: float = 0.0
    max_vun_drop: float = 0.05
    # Collapse shows first as lost variety, long before exact repeats: over run A's rounds the
    # distinct prototypes (anonymous formula + space group) per valid sample went 0.62, 0.54, 0.39,
    # 0.25, 0.18 while uniqueness stayed 100, 100, 99, 95 % (the paper protocol then saw 80 %).
    # The run stops when a round's variety falls below this share of the first round's.
    min_variety_ratio: float = 0.75
    guard_window: int = 2  # rounds pooled for the valid∧unique∧novel guard
    seed: int = 1_000_000
    signals: AlignSignals = field(default_factory=AlignSignals)
    reward: RewardSettings = field(default_factory=RewardSettings)
    # A user's own target region (the Fine-tune page): the cells to cycle through instead of both
    # sliders' whole grid, the elements the sampler may write, and elements a sample must contain
    # to earn any reward (say, O for oxides).
    grid: list[tuple[float | None, float | None]] | None = None
    elements: list[str] | None = None
    required_elements: list[str] | None = None

    def validate(self) -> None:
        if self.rounds < 1 or self.cells_per_round < 1 or self.samples_per_cell < 1:
            raise ValueError("rounds, cells per round and samples per cell must be at least 1")
        if not 0 < self.learning_rate < 1 or self.batch_size < 1:
            raise ValueError("learning rate must lie in (0, 1) and the batch size be at least 1")
        if self.repeat_penalty < 0:
            raise ValueError("the repeat penalty must be ≥ 0")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError("--minutes must be > 0")
        if self.grid is not None and not self.grid:
            raise ValueError("the target region holds no target")


def target_cells(band_gaps=PAPER_BAND_GAPS, e_hulls=E_HULL_TARGETS) -> list[tuple[float | None, float | None]]:
    """Every (band gap, E_hull) pair, "unknown" (None) included for each slider."""
    return [(g, e) for g in (*band_gaps, None) for e in (*e_hulls, None)]


def region_grid(gap_low: float, gap_high: float, e_hull: float | None, n_gaps: int = 3) -> list[tuple[float, float | None]]:
    """A target region as cells: `n_gaps` band gaps spread over [gap_low, gap_high] at one E_hull."""
    if not 0 <= gap_low <= gap_high:
        raise ValueError(f"the band-gap range must be 0 ≤ low ≤ high, got {gap_low}–{gap_high} eV")
    gaps = np.linspace(gap_low, gap_high, n_gaps if gap_high > gap_low else 1)
    return [(round(float(g), 3), e_hull) for g in gaps]


def round_cells(settings: AlignSettings, round_index: int) -> list[tuple[float | None, float | None]]:
    """This round's cells: a seeded draw without replacement, so the rounds cycle through the grid."""
    cells = [tuple(cell) for cell in settings.grid] if settings.grid else target_cells()
    rng = np.random.default_rng([settings.seed, round_index])
    return [cells[i] for i in rng.permutation(len(cells))[: settings.cells_per_round]]
