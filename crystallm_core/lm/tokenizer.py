"""The CrystaLLM-pi CIF tokenizer: 377 tokens, ids identical to the published model.

The vocabulary is built by code (no file is read), in the order CrystaLLM-pi uses:

    0-88     element symbols, in the original CrystaLLM order
    89-98    digits
    99-129   CIF tags, `loop_`, `data_`, `_atom_type_*` tags
    130-142  symbols (x y z . ( ) + - / ' , space newline)
    143-369  227 space groups written `<H-M symbol>_sg`
    370-376  <unk> <pad> <bos> <eos> [ ] <prop>

Tokenising collapses space/tab runs, turns the H-M symbol after
`_symmetry_space_group_name_H-M` into its `_sg` token, then matches vocabulary tokens
longest-first (numbers therefore go digit by digit). Unlike the original, characters
outside the vocabulary are reported (UnknownTokenError / encode_with_report), never dropped.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import spglib

# Frequency order of the original CrystaLLM vocabulary (crystallm/_tokenizer.py); ids depend on it.
ELEMENTS = [
    "Si", "C", "Pb", "I", "Br", "Cl", "Eu", "O", "Fe", "Sb", "In", "S", "N", "U", "Mn", "Lu",
    "Se", "Tl", "Hf", "Ir", "Ca", "Ta", "Cr", "K", "Pm", "Mg", "Zn", "Cu", "Sn", "Ti", "B", "W",
    "P", "H", "Pd", "As", "Co", "Np", "Tc", "Hg", "Pu", "Al", "Tm", "Tb", "Ho", "Nb", "Ge", "Zr",
    "Cd", "V", "Sr", "Ni", "Rh", "Th", "Na", "Ru", "La", "Re", "Y", "Er", "Ce", "Pt", "Ga", "Li",
    "Cs", "F", "Ba", "Te", "Mo", "Gd", "Pr", "Bi", "Sc", "Ag", "Rb", "Dy", "Yb", "Nd", "Au", "Os",
    "Pa", "Sm", "Be", "Ac", "Xe", "Kr", "He", "Ne", "Ar",
]
DIGITS = [str(d) for d in range(10)]
KEYWORDS = [
    "_cell_length_b", "_atom_site_occupancy", "_atom_site_attached_hydrogens", "_cell_length_a",
    "_cell_angle_beta", "_symmetry_equiv_pos_as_xyz", "_cell_angle_gamma", "_atom_site_fract_x",
    "_symmetry_space_group_name_H-M", "_symmetry_Int_Tables_number", "_chemical_formula_structural",
    "_chemical_name_systematic", "_atom_site_fract_y", "_atom_site_symmetry_multiplicity",
    "_chemical_formula_sum", "_atom_site_label", "_atom_site_type_symbol", "_cell_length_c",
    "_atom_site_B_iso_or_equiv", "_symmetry_equiv_pos_site_id", "_cell_volume",
    "_atom_site_fract_z", "_cell_angle_alpha", "_cell_formula_units_Z", "loop_", "data_",
    "_atom_type_symbol", "_atom_type_electronegativity", "_atom_type_radius",
    "_atom_type_ionic_radius", "_atom_type_oxidation_number",
]
SYMBOLS = ["x", "y", "z", ".", "(", ")", "+", "-", "/", "'", ",", " ", "\n"]
# International Tables numbers in the order of CrystaLLM's spacegroups.txt. The symbols come
# from spglib (the short H-M symbols pymatgen's CifWriter writes). Three groups never had a
# token: P4_222 (93), P6 (168) and P432 (207).
SPACE_GROUP_ORDER = [
    191, 74, 96, 136, 227, 156, 147, 99, 212, 126, 18, 34, 60, 86, 8, 160, 64, 41, 113, 111, 198,
    148, 202, 35, 222, 192, 187, 145, 164, 153, 197, 189, 102, 28, 51, 121, 163, 205, 59, 47, 138,
    140, 119, 144, 27, 63, 23, 70, 149, 66, 169, 219, 182, 200, 152, 172, 230, 221, 14, 20, 7, 85,
    32, 40, 57, 157, 54, 16, 218, 49, 181, 196, 90, 21, 48, 185, 92, 175, 42, 88, 127, 31, 106, 94,
    220, 87, 100, 43, 143, 178, 30, 132, 91, 36, 188, 155, 76, 208, 52, 89, 50, 9, 98, 176, 186,
    141, 77, 129, 53, 83, 225, 123, 44, 130, 190, 46, 170, 13, 125, 72, 179, 194, 139, 69, 10, 117,
    82, 12, 131, 75, 228, 78, 11, 217, 112, 210, 6, 56, 118, 213, 195, 108, 161, 38, 71, 45, 79,
    203, 1, 55, 133, 204, 134, 26, 162, 166, 206, 177, 22, 3, 2, 25, 81, 39, 180, 165, 95, 97, 62,
    173, 158, 201, 104, 174, 124, 24, 135, 159, 37, 137, 193, 5, 61, 116, 110, 4, 151, 105, 224, 15,
    146, 215, 211, 17, 122, 120, 184, 171, 154, 150, 29, 142, 214, 209, 33, 68, 73, 128, 109, 19,
    167, 199, 115, 223, 107, 216, 58, 114, 65, 183, 101, 84, 229, 226, 80, 103, 67,
]
SPECIAL_TOKENS = ["<unk>", "<pad>", "<bos>", "<eos>", "[", "]", "<prop>"]
SG_SUFFIX = "_sg"
VOCAB_SIZE = 377


@functools.cache
def standard_settings() -> dict[int, tuple[str, int]]:
    """IT number 1-230 -> (short H-M symbol as spglib/CifWriter spell it, e.g. 'P2_1/c',
    'Cmce'; Hall number of the standard setting, the first one listed for the group)."""
    settings: dict[int, tuple[str, int]] = {}
    for hall_number in range(1, 531):
        sg_type = spglib.get_spacegroup_type(hall_number)
        settings.setdefault(sg_type.number, (sg_type.international_short, hall_number))
    return settings


def build_vocabulary() -> list[str]:
    """The 377 CrystaLLM-pi tokens; a token's position is its id."""
    settings = standard_settings()
    vocab = (ELEMENTS + DIGITS + KEYWORDS + SYMBOLS
             + [settings[n][0] + SG_SUFFIX for n in SPACE_GROUP_ORDER] + SPECIAL_TOKENS)
    if len(vocab) != VOCAB_SIZE or len(set(vocab)) != VOCAB_SIZE:
        raise RuntimeError(f"vocabulary has {len(vocab)} tokens ({len(set(vocab))} distinct), expected 377")
    return vocab


class UnknownTokenError(ValueError):
    """Text holds characters the vocabulary cannot encode; `fragments` lists them."""

    def __init__(self, fragments: list[str]):
        self.fragments = fragments
        shown = ", ".join(repr(f) for f in dict.fromkeys(fragments))
        super().__init__(f"text contains {len(fragments)} fragment(s) outside the CrystaLLM-pi "
                         f"vocabulary: {shown}")


class CIFTokenizer:
    """Character-level CIF tokenizer with CrystaLLM-pi ids (see module docstring)."""

    def __init__(self) -> None:
        self.vocab = build_vocabulary()
        self.token_to_id = {token: i for i, token in enumerate(self.vocab)}
        self.unk_id, self.pad_id, self.bos_id, self.eos_id = 370, 371, 372, 373
        self.open_id, self.close_id, self.prop_id = 374, 375, 376
        self.space_groups = {t[: -len(SG_SUFFIX)] for t in self.vocab if t.endswith(SG_SUFFIX)}
        # group 1: a vocabulary token; group 2: a run of characters it cannot encode
        # Alternatives sorted longest-first: the regex engine takes the first that matches.
        known = "|".join(re.escape(t) for t in sorted(self.vocab, key=len, reverse=True))
        self._token_re = re.compile(f"({known})|((?:(?!{known}).)+)", re.DOTALL)
        self._space_re = re.compile(r"[ \t]+")
        self._sg_re = re.compile(r"(_symmetry_space_group_name_H-M ?\[?)([^\s\[\]']+)(?=[\]\s]|$)")
        self._skip_ids = {self.bos_id, self.eos_id, self.pad_id, self.open_id, self.close_id,
                          self.prop_id}

    def __len__(self) -> int:
        return len(self.vocab)

    def _mark_space_group(self, match: re.Match) -> str:
        symbol = match.group(2)
        return match.group(1) + (symbol + SG_SUFFIX if symbol in self.space_groups else symbol)

    def _split(self, text: str) -> tuple[list[str], list[str]]:
        """(tokens with '<unk>' for unknown runs, the unknown runs)."""
        text = self._sg_re.sub(self._mark_space_group, self._space_re.sub(" ", text))
        tokens, unknown = [], []
        for known, bad in self._token_re.findall(text):
            if bad:
                unknown.append(bad)
                tokens.append("<unk>")
            else:
                tokens.append(known)
        return tokens, unknown

    def tokenize(self, text: str) -> list[str]:
        """Token strings of `text`; raises UnknownTokenError if anything cannot be encoded."""
        tokens, unknown = self._split(text)
        if unknown:
            raise UnknownTokenError(unknown)
        return tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; raises UnknownTokenError if anything cannot be encoded."""
        return [self.token_to_id[t] for t in self.tokenize(text)]

    def encode_with_report(self, text: str) -> tuple[list[int], list[str]]:
        """(ids with unk_id for each unknown run, the unknown runs); never raises on content."""
        tokens, unknown = self._split(text)
        return [self.token_to_id[t] for t in tokens], unknown

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Raw token strings (space groups keep their `_sg` suffix)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self.vocab)]
        if bad:
            raise ValueError(f"token ids outside 0-{len(self.vocab) - 1}: {bad[:10]}")
        return [self.vocab[i] for i in ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. skip_special_tokens drops <bos> <eos> <pad> [ ] <prop>."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skip_ids]
        tokens = self.convert_ids_to_tokens(ids)
        return "".join(t[: -len(SG_SUFFIX)] if t.endswith(SG_SUFFIX) else t for t in tokens)


@functools.cache
def get_tokenizer() -> CIFTokenizer:
    """The shared tokenizer (building it compiles the regexes once, ~tens of ms)."""
    return CIFTokenizer()
