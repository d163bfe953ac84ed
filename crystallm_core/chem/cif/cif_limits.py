"""How much work a CIF asks of pymatgen's parser, measured before parsing.

CifParser applies every symmetry operator to every atom-site row and merges the images, at a
cost that grows with the square of rows × operators: 500 rows in Fm-3m (192 operators) took
308 s on one core. Uploads and `evaluate` inputs are untrusted, so the parser only sees a CIF
whose rows × operators stay under a budget (~1 s here); larger ones fail with the reason.
"""
from __future__ import annotations

import warnings

from pymatgen.io.cif import CifFile

from crystallm_core.chem.cif.cif_format import symmetry_operators

MAX_CIF_CHARS = 1_000_000  # the model writes ~2 kB; run_files reads no CIF file over 1 MB either
MAX_EXPANDED_SITES = 8000  # atom-site rows × symmetry operators the parser may expand
MAX_ROWS = 2000  # more rows are more sites than validity analyses (ValidityConfig.max_sites)
MOST_OPERATORS = 192  # Fm-3m & co.: the bound when a CIF's operators cannot be counted
OPERATOR_TAGS = ("_symmetry_equiv_pos_as_xyz", "_space_group_symop_operation_xyz")
SYMBOL_TAGS = ("_symmetry_space_group_name_H-M", "_space_group_name_H-M_alt")


def operator_count(block: dict) -> int:
    """Symmetry operators the parser will apply: the written ones, else the H-M symbol's."""
    for tag in OPERATOR_TAGS:
        if tag in block:
            value = block[tag]
            return 1 if isinstance(value, str) else len(value)
    for tag in SYMBOL_TAGS:
        symbol = block.get(tag)
        if isinstance(symbol, str):
            try:
                return len(symmetry_operators(symbol.replace(" ", "")))
            except Exception:  # unknown or odd symbol: assume the worst
                break
    return MOST_OPERATORS


def row_count(block: dict) -> int:
    for tag in ("_atom_site_fract_x", "_atom_site_Cartn_x", "_atom_site_cartn_x"):
        if tag in block:
            value = block[tag]
            return 1 if isinstance(value, str) else len(value)
    return 0


def cif_size_problem(text: str, max_expanded: int = MAX_EXPANDED_SITES) -> str | None:
    """Why this CIF is too big to parse (None if it is not): over MAX_CIF_CHARS, or more
    atom-site rows × symmetry operators than `max_expanded`. Text the tokeniser cannot read
    is left to the parser, which fails fast on it."""
    if len(text) > MAX_CIF_CHARS:
        return f"the CIF is {len(text) / 1e6:.1f} MB; at most {MAX_CIF_CHARS / 1e6:g} MB is read"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = [block.data for block in CifFile.from_str(text).data.values()]
    except Exception:
        return None
    rows = sum(row_count(block) for block in blocks)
    if rows > MAX_ROWS:
        return f"{rows} atom-site rows is more than the {MAX_ROWS} this tool reads"
    expanded = sum(row_count(block) * operator_count(block) for block in blocks)
    if expanded > max_expanded:
        return (f"{rows} atom-site rows with their symmetry operators make {expanded} sites to expand; "
                f"at most {max_expanded} are parsed")
    return None
