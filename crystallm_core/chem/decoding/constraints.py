"""Constrained decoding: a per-sample CIF state machine under which every finished CIF is
formula- and multiplicity-consistent, parses, and states a space group its cell can have.

The model's choices stay the model's. The decoder only
- writes what earlier tokens determine (jump-forward): the atom-type loop, the space-group
  number, both formula fields, Z, the volume, the identity symmetry loop, site labels and
  occupancies, and cell parameters that the crystal system fixes (b = a, 90°, 120°);
- masks choices that cannot lead to a valid CIF: space groups whose Wyckoff multiplicities
  cannot add up to the counts, cell lengths shorter than an atom's distance to its own image
  may be, elements with no atoms left, multiplicities that overshoot or leave a remainder no
  position can hold, malformed numbers;
- rewinds a site row whose orbit disagrees with its multiplicity or puts atoms closer than
  the bond check allows (`validity.shortest_allowed_distance`, so the two cannot disagree)
  and lets the model write that row again; after `row_retries` it backs up to the cell,
  after `cell_retries` it restarts the sample, after `restarts` it gives up.

The CIF grammar is written once, as a generator (`CifProgram.run`) that yields what it needs
next: `Force(token)` or `Choose(allowed tokens)`, and receives the token. `CifConstraint`
drives it for the sampler. Its state is a pure function of the tokens so far (plus retry
counters), so a rewind simply replays the kept tokens into a fresh program.

The final check (every validity check, in the isolated checker: about a tenth of constrained
sampling's time when run inline) can run in the background: with `background=True` the step
that completes the last site row says `waiting`, the sampler keeps the other slots going, and
`poll()` hands back what follows once the judgement is in. It changes nothing in what is
written.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from crystallm_core.chem.decoding.cif_program import (
    CifProgram,
    ConstraintConfig,
    Retries,
    final_problem,
)
from crystallm_core.chem.decoding.grammar import (
    Check,
    Choose,
    CifTokens,
    Force,
    GiveUp,
    Program,
    Rewind,
)
from crystallm_core.lm.sampler import ConstraintStep

__all__ = ["CifConstraint", "CifTokens", "ConstraintConfig", "PromptMismatch"]

# One thread suffices: the checker process serves one call at a time; the thread only waits on it.
CHECKS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="final-check")


class PromptMismatch(ValueError):
    """The prompt holds a token the CIF grammar would not allow there."""


class CifConstraint:
    """Drives a `CifProgram` for one sample: the sampler's `DecodingConstraint`."""

    def __init__(self, tokens: CifTokens, config: ConstraintConfig = ConstraintConfig(), background: bool = False):
        self.t, self.config, self.background = tokens, config, background
        self.check: Future | None = None  # the final check running in the background
        self.retries = Retries()
        self.history: list[int] = []
        self.prompt_length = 0
        self.program: Program | None = None
        self.request = None

    def restart_program(self) -> None:
        self.program = CifProgram(self.t, self.config, self.retries, self.history).run()
        self.request = next(self.program)

    def start(self, prompt_ids: list[int]) -> ConstraintStep:
        """Feed the prompt; returns the tokens forced after it. PromptMismatch if it breaks the grammar."""
        self.history.clear()
        self.prompt_length = len(prompt_ids)
        self.restart_program()
        for token in prompt_ids:
            if not self.accepts(token):
                raise PromptMismatch(f"the prompt's token {self.t.tokenizer.vocab[token]!r} is not allowed "
                                     f"at position {len(self.history)} by constrained decoding")
            step = self.send(token)
            if step.rewind_to is not None or step.gave_up:
                raise PromptMismatch("the prompt cannot be completed into a valid CIF")
        return self.follow()

    def retry_counts(self) -> dict:
        return self.retries.to_dict()

    def accepts(self, token: int) -> bool:
        request = self.request
        return (isinstance(request, Force) and request.token == token) or \
            (isinstance(request, Choose) and token in request.allowed)

    def allowed(self) -> frozenset[int]:
        """Tokens the model may choose now."""
        if isinstance(self.request, Choose):
            return self.request.allowed
        return frozenset([self.request.token]) if isinstance(self.request, Force) else frozenset()

    def send(self, token: int) -> ConstraintStep:
        self.history.append(token)
        return self.resume(token)

    def resume(self, value) -> ConstraintStep:
        """Send the program a token (or a check's outcome); what its next request means for the sampler."""
        try:
            self.request = self.program.send(value)
        except StopIteration:
            self.request = None
            return ConstraintStep(finished=True)
        if isinstance(self.request, Check):
            if self.background:
                self.check = CHECKS.submit(final_problem, self.request.text)
                return ConstraintStep(waiting=True)
            return self.resume(final_problem(self.request.text))
        if isinstance(self.request, Rewind):
            keep = max(self.request.keep, self.prompt_length)  # a prompt is never taken back
            self.replay(self.history[:keep])
            return ConstraintStep(forced=self.follow().forced, rewind_to=keep)
        if isinstance(self.request, GiveUp):
            return ConstraintStep(gave_up=self.request.reason)
        return ConstraintStep()

    def poll(self) -> ConstraintStep | None:
        """While a background check runs: None; then what follows it (the end, or a rewind)."""
        if self.check is None or not self.check.done():
            return None
        outcome, self.check = self.check.result(), None
        step = self.resume(outcome)
        if step.rewind_to is not None or step.finished or step.gave_up or step.waiting:
            return step
        return self.follow()

    def replay(self, tokens: list[int]) -> None:
        self.history.clear()
        self.restart_program()
        for token in tokens:
            self.history.append(token)
            self.request = self.program.send(token)

    def advance(self, token: int) -> ConstraintStep:
        """The model chose `token`: returns the forced continuation, a rewind or the end."""
        if not self.accepts(token):
            raise ValueError(f"token {token} was not allowed here")
        step = self.send(token)
        if step.rewind_to is not None or step.finished or step.gave_up or step.waiting:
            return step
        return self.follow()

    def follow(self) -> ConstraintStep:
        """Write every forced token from here to the next choice."""
        forced = []
        while isinstance(self.request, Force):
            token = self.request.token
            forced.append(token)
            step = self.send(token)
            if step.finished:
                return ConstraintStep(forced=forced, finished=True)
            if step.waiting:
                return ConstraintStep(forced=forced, waiting=True)
            if step.rewind_to is not None or step.gave_up:  # a forced token completed a failing check
                return step
        return ConstraintStep(forced=forced)
