"""CIF text in CrystaLLM-pi's training format, and repair of what the model writes.

Training format (reference §2), built from a pymatgen Structure:

    data_[Ti2O4]
    loop_
     _atom_type_symbol
     _atom_type_electronegativity
     _atom_type_radius
     _atom_type_ionic_radius
    [
      Ti  1.5400  1.4000  0.8517
      O  3.4400  0.6000  1.2600
    ]
    _symmetry_space_group_name_H-M [P4_2/mnm]
    _cell_length_a [4.5940]
    ...
    _chemical_formula_sum '[Ti2 O4]'
    ...
    loop_
     _symmetry_equiv_pos_site_id
     _symmetry_equiv_pos_as_xyz
      1  'x, y, z'
    loop_
     _atom_site_type_symbol
     ...
    [
      Ti  Ti0  2  0.0000  0.0000  0.0000  1
      O  O1  4  0.1952  0.8048  0.5000  1
    ]

Brackets mark the values the model must choose; everything else is fixed layout.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import spglib
from pymatgen.core import Composition, Element, Structure
from pymatgen.core.operations import SymmOp
from pymatgen.io.cif import CifWriter
from pymatgen.symmetry.groups import SpaceGroup

from crystallm_core.lm.tokenizer import standard_settings

DECIMALS = 4
# Fallbacks the original uses where pymatgen has no value (van der Waals radii, Allen X).
NOBLE_GAS_RADIUS = {"He": 1.40, "Ne": 1.54, "Ar": 1.88, "Kr": 2.02, "Xe": 2.16, "Rn": 2.20}
NOBLE_GAS_X = {"He": 4.16, "Ne": 4.79, "Ar": 3.24}
ATOM_TYPE_TAGS = ["_atom_type_symbol", "_atom_type_electronegativity", "_atom_type_radius",
                  "_atom_type_ionic_radius"]
SYMMETRY_TAGS = ["_symmetry_equiv_pos_site_id", "_symmetry_equiv_pos_as_xyz"]
REQUIRED_TAGS = ["_cell_length_a", "_cell_length_b", "_cell_length_c", "_cell_angle_alpha",
                 "_cell_angle_beta", "_cell_angle_gamma", "_atom_site_fract_z"]

FLOAT_RE = re.compile(r"[-+]?\d*\.\d+([eE][-+]?\d+)?")
SG_RE = re.compile(r"_symmetry_space_group_name_H-M[ \t]*(?:'([^'\n]*)'|([^\s']+))?")
# a loop_ header followed by its tag lines and its rows, up to the next loop_/tag/data_
LOOP_RE = re.compile(r"^loop_[ \t]*\n((?:[ \t]*_\S+[ \t]*(?:\n|$))+)((?:(?![ \t]*(?:_|loop_|data_))[^\n]+(?:\n|$))*)",
                     re.MULTILINE)


@dataclass(frozen=True)
class RepairResult:
    """A standard CIF (cif) or why none could be made (reason)."""
    cif: str | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.cif is not None


def atom_type_values(element: Element) -> tuple[str, str, str]:
    """(electronegativity, atomic radius, average ionic radius) as the training CIFs print them.

    Fallback values are printed as plain floats ('4.16', '1.4'), like the original does.
    """
    symbol = element.symbol
    x = str(NOBLE_GAS_X[symbol]) if math.isnan(element.X) and symbol in NOBLE_GAS_X else f"{float(element.X):.{DECIMALS}f}"
    if element.atomic_radius is None:
        if symbol not in NOBLE_GAS_RADIUS:
            raise ValueError(f"no atomic radius known for {symbol}")
        radius = str(NOBLE_GAS_RADIUS[symbol])
    else:
        radius = f"{float(element.atomic_radius):.{DECIMALS}f}"
    return x, radius, f"{float(element.average_ionic_radius):.{DECIMALS}f}"


def atom_type_rows(composition: Composition | str) -> list[str]:
    """One '  El  X  r  r_ion' row per element, sorted as pymatgen sorts elements (by X)."""
    composition = Composition(composition)
    return ["  " + "  ".join([el.symbol, *atom_type_values(el)]) for el in sorted(composition.elements)]


def atom_type_loop(composition: Composition | str) -> str:
    """The bracketed atom-type loop of a training CIF (used in level-3 prompts)."""
    return "\n".join(["loop_", *(" " + tag for tag in ATOM_TYPE_TAGS), "[",
                      *atom_type_rows(composition), "]"])


def round_number(match: re.Match) -> str:
    """Round to 4 decimals; whole numbers written 'n.0' become 'n' (as the original does)."""
    text = match.group()
    decimals = text.split(".")[-1]
    if len(decimals) <= DECIMALS:
        value = float(text)
        return str(int(value)) if decimals == "0" and value == int(value) else text
    return f"{round(float(text), DECIMALS):.{DECIMALS}f}"


def add_brackets(lines: list[str]) -> list[str]:
    """Reference §2 step 7: bracket every value the model must generate."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        i += 1
        if stripped.startswith("data_"):
            out.append("data_[" + stripped[len("data_"):].strip() + "]")
        elif stripped.startswith("loop_"):
            out.append(line)
            headers = []
            while i < len(lines) and lines[i].strip().startswith("_"):
                headers.append(lines[i].split()[0])
                out.append(lines[i])
                i += 1
            rows = []
            while i < len(lines) and not lines[i].strip().startswith(("data_", "loop_", "_")):
                rows.append(lines[i])
                i += 1
            # the symmetry loop is fixed text ("1 'x, y, z'"), so it gets no brackets
            out.extend(rows if set(headers) & set(SYMMETRY_TAGS) else ["[", *rows, "]"])
        elif stripped.startswith("_") and len(stripped.split(maxsplit=1)) == 2:
            key, value = stripped.split(maxsplit=1)
            value = value.strip()
            if key == "_chemical_formula_sum":
                out.append(f"{key} '[{value.strip(chr(39) + chr(34)).strip()}]'")
            elif key == "_symmetry_space_group_name_H-M":
                # 'P 1' -> [P1]: the symbol must be one vocabulary token
                out.append(f"{key} [{value.strip(chr(39) + chr(34)).replace(' ', '')}]")
            else:
                out.append(f"{key} [{value}]")
        else:
            out.append(line)
    return out


def structure_to_model_cif(structure: Structure, symprec: float = 0.1) -> str:
    """The bracketed training CIF of `structure` (reference §2), without <bos>/<eos>.

    Raises ValueError for structures the format cannot hold (disordered, empty, Z = 0).
    """
    if len(structure) == 0:
        raise ValueError("structure has no sites")
    if not structure.is_ordered:
        raise ValueError("structure has partial occupancies; only ordered structures are supported")
    structure = structure.copy()
    structure.remove_oxidation_states()  # else CifWriter writes 'Ti4+' and its own atom-type loop
    try:
        cif = str(CifWriter(structure, symprec=symprec))
    except Exception:  # symmetry search failed: the original falls back to a P1 CIF
        cif = str(CifWriter(structure))
    cif = cif[cif.index("data_"):].strip()  # drop the '# generated using pymatgen' comment
    z = re.search(r"_cell_formula_units_Z\s+(\d+)", cif)
    if z is None or int(z.group(1)) == 0:
        raise ValueError("CIF has Z = 0")
    formula_sum = re.search(r"_chemical_formula_sum\s+(.+)", cif).group(1)
    cif = re.sub(r"^data_.*$", "data_" + formula_sum.replace("'", "").replace(" ", ""), cif,
                 count=1, flags=re.MULTILINE)
    # semi-symmetrise: keep only the identity operator
    cif = re.sub(r"(_symmetry_equiv_pos_as_xyz\n)(.*?)(?=\n(?:\S| \S))", r"\g<1>  1  'x, y, z'",
                 cif, flags=re.DOTALL)
    block = "\n".join(["loop_", *(" " + tag for tag in ATOM_TYPE_TAGS),
                       *atom_type_rows(formula_sum.strip("'"))])
    cif = cif.replace("_symmetry_space_group_name_H-M", block + "\n_symmetry_space_group_name_H-M", 1)
    cif = FLOAT_RE.sub(round_number, cif)
    return "\n".join(add_brackets(cif.splitlines()))


def training_text(model_cif: str) -> str:
    """What the model is trained on: '<bos>\\n{cif}\\n<eos>'."""
    return f"<bos>\n{model_cif.strip()}\n<eos>"


def repair_numbers(cif: str) -> str:
    """'3.6.69' -> '3.669', '0.' -> '0.0', '.12' -> '0.12' (reference §2 post-processing)."""
    previous = None
    while previous != cif:
        previous, cif = cif, re.sub(r"(\d+\.\d+)\.(\d+)", r"\1\2", cif)
    cif = re.sub(r"(?<![\w.])(\d+\.)(?![\w.])", r"\g<1>0", cif)
    return re.sub(r"(?<![\w.])(\.\d+)", r"0\1", cif)


@functools.cache
def symmetry_operators(symbol: str) -> tuple[str, ...]:
    """'x, y, z'-style operators of a space group, identity first; ValueError if unknown.

    Standard short symbols read spglib's table (instant, and the setting CifWriter writes
    in); pymatgen's SpaceGroup gives the same operators but takes seconds for F groups.
    """
    hall_numbers = {symbol: hall for symbol, hall in standard_settings().values()}
    if symbol in hall_numbers:
        data = spglib.get_symmetry_from_database(hall_numbers[symbol])
        ops = [SymmOp.from_rotation_and_translation(r, t) for r, t in
               zip(data["rotations"], data["translations"])]
    else:
        ops = SpaceGroup(symbol).symmetry_ops
    return tuple(sorted((op.as_xyz_str() for op in ops), key=lambda op: (op != "x, y, z", op)))


def symmetry_loop(symbol: str) -> str:
    """The full symmetry-operator loop of a space group (ValueError if unknown)."""
    rows = [f"  {i}  '{op}'" for i, op in enumerate(symmetry_operators(symbol), start=1)]
    return "\n".join(["loop_", *(" " + tag for tag in SYMMETRY_TAGS), *rows])


def rebuild_loops(cif: str, symbol: str) -> str:
    """Drop the atom-type loop; write the full symmetry loop where the model wrote its own
    (or, if it wrote none, just before the atom-site loop)."""
    parts: list[str] = []
    position, placed = 0, False
    for match in LOOP_RE.finditer(cif):
        first_tag = match.group(1).split()[0]
        parts.append(cif[position:match.start()])
        if first_tag in SYMMETRY_TAGS and not placed:
            parts.append(symmetry_loop(symbol) + "\n")
            placed = True
        elif first_tag.startswith("_atom_site_") and not placed:
            parts.append(symmetry_loop(symbol) + "\n" + match.group(0))
            placed = True
        elif first_tag not in SYMMETRY_TAGS and first_tag != ATOM_TYPE_TAGS[0]:
            parts.append(match.group(0))
        position = match.end()
    return "".join(parts) + cif[position:]


def atom_site_rows(cif: str) -> list[str]:
    """Complete rows of the atom-site loop (a truncated last row is not counted)."""
    for match in LOOP_RE.finditer(cif):
        tags = match.group(1).split()
        if "_atom_site_fract_x" in tags:
            return [row for row in match.group(2).splitlines() if len(row.split()) >= len(tags)]
    return []


def tidy(cif: str) -> str:
    """Collapse runs of spaces (keeping indentation) and drop blank lines."""
    cif = re.sub(r"(?<=\S)[ \t]+(?=\S)", " ", cif)
    return re.sub(r"\n\s*\n+", "\n", cif).strip() + "\n"


def repair_generated_cif(text: str) -> RepairResult:
    """Turn raw model output into a standard CIF (reference §2 post-processing). Never raises."""
    try:
        return repair(text)
    except Exception as error:  # one odd sample must never break a batch
        return RepairResult(None, f"repair failed: {type(error).__name__}: {error}")


def repair(text: str) -> RepairResult:
    text = text.split("<eos>", 1)[0]
    for token in ("<bos>", "<pad>", "<prop>", "[", "]"):
        text = text.replace(token, "")
    if "<unk>" in text:
        return RepairResult(None, "contains <unk> tokens")
    if "data_" not in text:
        return RepairResult(None, "no data_ line")
    cif = repair_numbers(tidy(text[text.index("data_"):]))
    match = SG_RE.search(cif)
    symbol = ((match.group(1) or match.group(2) or "") if match else "").strip()
    if not symbol:
        return RepairResult(None, "no space group symbol")
    try:
        symmetry_operators(symbol)
    except Exception:
        return RepairResult(None, f"unknown space group '{symbol}'")
    missing = [tag for tag in REQUIRED_TAGS if tag not in cif]
    if "_atom_site_fract_z" in missing or not atom_site_rows(cif):
        return RepairResult(None, "truncated: no atom sites")
    if missing:
        return RepairResult(None, "truncated: missing " + ", ".join(missing))
    return RepairResult(tidy(rebuild_loops(cif, symbol)))
