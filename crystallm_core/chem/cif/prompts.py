"""Composition / space-group prompts (the reference's prompt levels 1–4), with validation.

level 1: `<bos>\\ndata_[`                         (no composition)
level 2: `<bos>\\ndata_[Ti2O4]\\n`                 (counts = reduced formula × Z)
level 3: level 2 + atom-type loop + `_symmetry_space_group_name_H-M`
level 4: level 3 + ` [P4_2/mnm]\\n`               (space group fixed)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pymatgen.core import Composition, Element

from crystallm_core.chem.cif.cif_format import atom_type_loop
from crystallm_core.lm.tokenizer import CIFTokenizer

MAX_ATOMS = 20  # the model's context holds CIFs of about 20 atoms per cell (reference §6)
SPACE_GROUP_TAG = "_symmetry_space_group_name_H-M"
CENTRING_MULTIPLICITY = {"P": 1, "A": 2, "B": 2, "C": 2, "I": 2, "R": 3, "F": 4}  # lattice points per conventional cell
MAX_AMOUNT = 10_000  # atoms of one element: beyond any cell (and floats lose integers past 1e16)
FORMULA_PATTERN = re.compile(r"^\s*([A-Z][a-z]?\d*(\.\d+)?\s*)+$")


@dataclass(frozen=True)
class Prompt:
    text: str
    level: int
    formula: str | None  # full formula of the cell, e.g. "Ti2O4"


def shown(text: str, limit: int = 40) -> str:
    """A user's text quoted in a message: control characters escaped, cut short when long."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def parse_composition(formula: str) -> Composition:
    """A user's formula → Composition, with messages a researcher can act on."""
    cleaned = formula.replace(" ", "")
    if not cleaned or not FORMULA_PATTERN.match(cleaned):
        raise ValueError(f"{shown(formula)} is not a chemical formula (write it like 'TiO2' or 'Li3PS4')")
    for symbol, amount in re.findall(r"([A-Z][a-z]?)([\d.]*)", cleaned):
        if not Element.is_valid_symbol(symbol):
            raise ValueError(f"'{symbol}' in {shown(formula)} is not a chemical element")
        if amount and float(amount) == 0:
            raise ValueError(f"{symbol}{amount} in {shown(formula)}: every element needs at least one atom")
        if amount and float(amount) > MAX_AMOUNT:
            raise ValueError(f"{shown(symbol + amount, 12)} in {shown(formula)}: far more atoms than a cell holds")
    composition = Composition(cleaned)
    if any(not float(amount).is_integer() for amount in composition.values()):
        raise ValueError(f"{shown(formula)} has fractional amounts; give integer atom counts (ordered structures only)")
    return composition


def listed(symbols: list[str], limit: int = 8) -> str:
    """'A, B, C' of distinct user entries, each `shown` when odd, and '… and k more' past `limit`."""
    distinct = list(dict.fromkeys(symbols))
    parts = [s if s.isalnum() and len(s) <= 8 else shown(s, 12) for s in distinct[:limit]]
    return ", ".join(parts) + (f" and {len(distinct) - limit} more" if len(distinct) > limit else "")


def element_token_ids(tokenizer: CIFTokenizer, allowed: list[str] | None) -> list[int]:
    """Ids of the element tokens NOT in `allowed` (to ban while sampling); [] when allowed is None."""
    if not allowed:
        return []
    unknown = [symbol for symbol in allowed if not Element.is_valid_symbol(symbol)]
    if unknown:
        raise ValueError(f"not chemical elements: {listed(unknown)}")
    outside_vocabulary = [symbol for symbol in allowed if symbol not in tokenizer.token_to_id]
    if outside_vocabulary:
        raise ValueError(f"the model cannot write these elements: {listed(outside_vocabulary)}")
    return [i for i, token in enumerate(tokenizer.vocab) if Element.is_valid_symbol(token) and token not in allowed]


def space_group_symbols(tokenizer: CIFTokenizer) -> list[str]:
    """H-M symbols the model's vocabulary can write, in vocabulary order."""
    return [token[: -len("_sg")] for token in tokenizer.vocab if token.endswith("_sg")]


def build_prompt(tokenizer: CIFTokenizer, composition: str | None = None, z: int | None = None, spacegroup: str | None = None) -> Prompt:
    """Validated prompt text for the sampler. Raises ValueError with a clear reason."""
    if composition is None or not composition.strip():
        if spacegroup:
            raise ValueError("a space group can only be fixed together with a composition")
        return Prompt("<bos>\ndata_[", 1, None)
    parsed = parse_composition(composition)
    unwritable = [el.symbol for el in parsed.elements if el.symbol not in tokenizer.token_to_id]
    if unwritable:
        raise ValueError(f"the model cannot write these elements: {listed(unwritable)}")
    reduced, factor = parsed.get_reduced_composition_and_factor()
    if z is not None and not (1 <= int(z) <= MAX_ATOMS):
        raise ValueError(f"Z (formula units per cell) must be between 1 and {MAX_ATOMS}, got {z}")
    cell = reduced * int(factor if z is None else z)
    if cell.num_atoms > MAX_ATOMS:
        raise ValueError(
            f"{cell.formula.replace(' ', '')} has {int(cell.num_atoms)} atoms in the cell; "
            f"the model writes at most {MAX_ATOMS} (lower Z or use a smaller formula)"
        )
    formula = cell.formula.replace(" ", "")
    text = f"<bos>\ndata_[{formula}]\n"
    if spacegroup is None or not spacegroup.strip():
        return Prompt(text, 2, formula)
    symbol = spacegroup.strip()
    if symbol not in space_group_symbols(tokenizer):
        raise ValueError(f"space group {shown(symbol)} is not one the model knows (use the Hermann–Mauguin symbol, e.g. 'Fm-3m')")
    check_centring(cell, symbol)
    text += atom_type_loop(cell).rstrip("\n") + f"\n{SPACE_GROUP_TAG} [{symbol}]\n"
    return Prompt(text, 4, formula)


def check_centring(cell: Composition, symbol: str) -> None:
    """A centred lattice repeats every atom: each element count must be a multiple of the centring.

    A necessary condition only (Wyckoff multiplicities can demand more), but it catches the
    common mistake of asking for e.g. NaCl with Z = 1 in Fm-3m (F-centring needs 4 of each).
    """
    factor = CENTRING_MULTIPLICITY.get(symbol[0], 1)
    odd = [f"{el.symbol}{int(n)}" for el, n in cell.items() if int(n) % factor]
    if odd:
        raise ValueError(
            f"space group {symbol} is {symbol[0]}-centred: every element count in the cell must be a multiple "
            f"of {factor}, but {cell.formula.replace(' ', '')} has {', '.join(odd)} (raise Z or pick another space group)"
        )
