"""Hostile CIF text for the fuzz harness: a mutation corpus made from real and generated CIFs,
and hypothesis strategies over it (issue 9).

A mutation takes a CIF and a `random.Random` and returns damaged text: truncations, deleted
or duplicated tokens, swapped tags, huge/NaN/negative numbers, non-ASCII, thousands of sites,
absurd cells, broken loops, spliced files. `mutants` applies 1–3 of them at random; the same
seed gives the same texts. The strategies draw the same mutations, so hypothesis can shrink.
"""
from __future__ import annotations

import csv
import gzip
import random
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from crystallm_core.chem.cif.cif_format import structure_to_model_cif, training_text

NUMBER_RE = re.compile(r"[-+]?\d+\.?\d*(?:[eE][-+]?\d+)?")
TAG_RE = re.compile(r"_[A-Za-z][\w-]*")
SITE_ROW_RE = re.compile(r"^\s*[A-Z][a-z]?\s+\S+\s+\d+\s+[-\d.]+\s+[-\d.]+\s+[-\d.]+\s+\S+\s*$", re.MULTILINE)
CELL_TAGS = ["_cell_length_a", "_cell_length_b", "_cell_length_c",
             "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma"]
BAD_NUMBERS = ["nan", "NaN", "inf", "-inf", "1e308", "1e400", "-1e308", "99999999999", "1e-300", "0", "0.0000",
               "-0.0", "-5.2", "-90", "180", "360", "1.#QNAN", "?", ".", "1e", "1.2.3", "0x1F", "１２", "4,5"]
ABSURD_CELLS = [  # a, b, c, alpha, beta, gamma
    ("10000", "10000", "10000", "90", "90", "90"),          # a 10^4 Å cell
    ("0.0001", "4", "4", "90", "90", "90"),                 # a sliver
    ("5", "5", "5", "0.0000", "90", "90"),                  # the angle that crashed spglib
    ("5", "5", "5", "119.99", "119.99", "119.99"),          # near-singular: a flat cell
    ("5", "5", "5", "60", "60", "179.999"),
    ("5", "5", "5", "10", "10", "10"),                      # edge of the sane range, nearly flat
    ("5", "5", "5", "120", "120", "120"),                   # exactly flat (volume 0)
    ("1e30", "1e30", "1e30", "90", "90", "90"),
    ("5", "5", "5", "190", "90", "90"),
    ("5", "5", "5", "90.0001", "89.9999", "179.9999"),
]
NON_ASCII = ["é", "Å", "°", "\u202e", "\x00", "\ufeff", "🧪", "１", "\u0301", "中", "\udcff", "\r", "\t", "\x1b[31m"]


def replace_one(pattern: re.Pattern, text: str, rng: random.Random, make: Callable[[str], str]) -> str:
    matches = list(pattern.finditer(text))
    if not matches:
        return text
    match = rng.choice(matches)
    return text[:match.start()] + make(match.group()) + text[match.end():]


def truncate(text: str, rng: random.Random) -> str:
    return text[:rng.randrange(len(text) + 1)]


def tokens(text: str) -> list[str]:
    return re.split(r"(\s+)", text)


def delete_token(text: str, rng: random.Random) -> str:
    parts = tokens(text)
    del parts[rng.randrange(len(parts))]
    return "".join(parts)


def duplicate_token(text: str, rng: random.Random) -> str:
    parts = tokens(text)
    i = rng.randrange(len(parts))
    parts.insert(i, parts[i] + rng.choice([" ", "", "\n"]))
    return "".join(parts)


def swap_tags(text: str, rng: random.Random) -> str:
    found = list(TAG_RE.finditer(text))
    if len(found) < 2:
        return text
    first, second = sorted(rng.sample(found, 2), key=lambda m: m.start())
    return (text[:first.start()] + second.group() + text[first.end():second.start()] + first.group()
            + text[second.end():])


def bad_number(text: str, rng: random.Random) -> str:
    return replace_one(NUMBER_RE, text, rng, lambda _: rng.choice(BAD_NUMBERS))


def scale_number(text: str, rng: random.Random) -> str:
    """A plausible-looking but wrong number (the model's typical slip)."""
    def scaled(number: str) -> str:
        try:
            return f"{float(number) * rng.choice([-1, 0.01, 0.5, 1.5, 10, 1e4]):.4f}"
        except ValueError:
            return number
    return replace_one(NUMBER_RE, text, rng, scaled)


def non_ascii(text: str, rng: random.Random) -> str:
    i = rng.randrange(len(text) + 1)
    return text[:i] + "".join(rng.choices(NON_ASCII, k=rng.randint(1, 3))) + text[i:]


def many_sites(text: str, rng: random.Random) -> str:
    """Thousands of atom-site rows (copies of one row, shifted), or 500 for the bond checks."""
    rows = SITE_ROW_RE.findall(text)
    if not rows:
        return text
    row = rows[-1].rstrip()
    count = rng.choice([500, 2001, 5000])
    extra = []
    for k in range(count):
        fields = row.split()
        fields[1] = f"{fields[1]}x{k}"
        fields[3] = f"{(k * 0.618034) % 1:.4f}"
        fields[4] = f"{(k * 0.414214) % 1:.4f}"
        extra.append("  " + "  ".join(fields))
    return text.replace(row, row + "\n" + "\n".join(extra), 1)


def absurd_cell(text: str, rng: random.Random) -> str:
    for tag, value in zip(CELL_TAGS, rng.choice(ABSURD_CELLS)):
        text = re.sub(rf"({tag}\s+\[?)[^\s\]]+", lambda m: m.group(1) + value, text, count=1)
    return text


def break_loop(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    kind = rng.randrange(5)
    header_lines = [i for i, line in enumerate(lines) if line.strip().startswith("_atom_site_")]
    if kind == 0:  # drop a loop_ keyword
        return re.sub(r"loop_\s*\n", "", text, count=1)
    if kind == 1 and header_lines:  # drop a column header: rows now have too many values
        del lines[rng.choice(header_lines)]
    elif kind == 2:  # a row with an extra value and an unbalanced quote
        rows = SITE_ROW_RE.findall(text)
        if rows:
            return text.replace(rows[0], rows[0].rstrip() + " 'x", 1)
    elif kind == 3:  # an empty loop
        lines.append("loop_\n _atom_site_label")
    elif lines:  # loop_ in the middle of a row
        i = rng.randrange(len(lines))
        lines[i] = lines[i] + " loop_"
    return "\n".join(lines)


def shuffle_lines(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    if len(lines) > 1:
        i, j = rng.sample(range(len(lines)), 2)
        lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def mangle_whitespace(text: str, rng: random.Random) -> str:
    return rng.choice([text.replace("\n", "\r\n"), text.replace("\n", "\r"), text.replace("  ", "\t"),
                       text.replace("\n", " "), "   \n" * 3 + text, text.replace(" ", "")])


def junk(text: str, rng: random.Random) -> str:
    """Binary noise (decoded as an upload is: UTF-8 with replacement), alone or inside the CIF."""
    noise = bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))).decode("utf-8", errors="replace")
    i = rng.randrange(len(text) + 1)
    return rng.choice([noise, text[:i] + noise + text[i:]])


MUTATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "truncate": truncate, "delete_token": delete_token, "duplicate_token": duplicate_token,
    "swap_tags": swap_tags, "bad_number": bad_number, "scale_number": scale_number, "non_ascii": non_ascii,
    "many_sites": many_sites, "absurd_cell": absurd_cell, "break_loop": break_loop,
    "shuffle_lines": shuffle_lines, "mangle_whitespace": mangle_whitespace, "junk": junk,
}
RARE = {"many_sites": 0.02, "junk": 0.5}  # weights relative to 1: big inputs are slow to make and check


def splice(first: str, second: str, rng: random.Random) -> str:
    return first[:rng.randrange(len(first) + 1)] + second[rng.randrange(len(second) + 1):]


def mutate(text: str, rng: random.Random, seeds: Sequence[str] = ()) -> tuple[str, list[str]]:
    """1–3 random mutations of `text` (or a splice with another seed); returns (text, their names)."""
    names = list(MUTATIONS)
    weights = [RARE.get(name, 1.0) for name in names]
    applied = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if seeds and rng.random() < 0.03:
            text, name = splice(text, rng.choice(seeds), rng), "splice"
        else:
            name = rng.choices(names, weights)[0]
            text = MUTATIONS[name](text, rng) if text else text
        applied.append(name)
    return text, applied


def mutants(seeds: Sequence[str], rng: random.Random) -> Iterator[tuple[str, list[str]]]:
    """Endless mutants of the seeds, each seed also given as it is now and then."""
    while True:
        seed = rng.choice(seeds)
        yield (seed, ["none"]) if rng.random() < 0.02 else mutate(seed, rng, seeds)


def cif_forms(structure: Structure) -> list[str]:
    """A structure as an upload (CifWriter, symmetrised and P1) and as the model writes it."""
    forms = [str(CifWriter(structure)), str(CifWriter(structure, symprec=0.1))]
    model_cif = structure_to_model_cif(structure)
    return forms + [model_cif, training_text(model_cif)]


def shared_cifs(data_dir: Path, limit: int) -> list[str]:
    """Up to `limit` Materials Project CIFs from shared/data/mp20 (none when it is absent)."""
    texts: list[str] = []
    for path in sorted(data_dir.glob("mp_20_*.csv.gz")):
        with gzip.open(path, "rt", newline="") as handle:
            for row in csv.DictReader(handle):
                if len(texts) >= limit:
                    return texts
                texts.append(row["cif"])
    return texts


def seed_corpus(structures: Sequence[Structure], extra: Sequence[str] = ()) -> list[str]:
    """Every form of every structure, plus extra texts (MP CIFs, model outputs)."""
    return [form for structure in structures for form in cif_forms(structure)] + list(extra)


def mutant_strategy(seeds: Sequence[str]):
    """A hypothesis strategy: a seed, 0–3 named mutations with their random streams, shrinkable
    (thousands of sites are left to the corpus and `pathological_cifs`: seconds each)."""
    from hypothesis import strategies as st

    names = sorted(set(MUTATIONS) - {"many_sites"})

    @st.composite
    def build(draw) -> str:
        text = draw(st.sampled_from(list(seeds)))
        for name in draw(st.lists(st.sampled_from(names), min_size=0, max_size=3)):
            text = MUTATIONS[name](text, draw(st.randoms(use_true_random=False))) if text else text
        return text

    return build()


def text_strategy():
    """Arbitrary text and CIF-like fragments (tags, numbers, loop_ keywords, brackets)."""
    from hypothesis import strategies as st

    pieces = st.sampled_from(["data_", "data_[NaCl]", "loop_", "\n", " ", "[", "]", "'", "<eos>", "<bos>",
                              *CELL_TAGS, "_atom_site_fract_x", "_symmetry_space_group_name_H-M", "P1", "Fm-3m",
                              "Na", "Cl", "0.5", "1e308", "nan", "-1"])
    return st.one_of(st.text(max_size=300), st.lists(pieces, max_size=60).map("".join))


def copper_supercell(n: int, jitter: float = 0.0, seed: int = 0) -> Structure:
    """fcc Cu, n×n×n conventional cells (4 n³ sites); jittered sites break the symmetry, so every
    site is its own orbit and the bond check meets them all."""
    structure = Structure(Lattice.cubic(3.615), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    structure.make_supercell([n, n, n])
    rng = random.Random(seed)
    for i in range(len(structure)) if jitter else ():
        structure.translate_sites([i], [rng.uniform(-jitter, jitter) for _ in range(3)], frac_coords=False)
    return structure


def pathological_cifs() -> dict[str, str]:
    """Inputs that must fail (or pass) within the per-check time limits, never stall a batch."""
    cu = Structure(Lattice.cubic(3.615), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    huge = cu.copy()
    huge.scale_lattice(1e12)  # a = 10^4 Å
    flat = Structure(Lattice.from_parameters(5, 5, 5, 119.999, 119.999, 119.999, vesta=True), ["Cu"], [[0, 0, 0]])
    symmetric = str(CifWriter(cu, symprec=0.1))
    many_rows = "\n".join(symmetric.splitlines() + [f"  Cu  Cu{k}  4  {k * 0.618 % 1:.4f}  {k * 0.414 % 1:.4f}  0.2500  1"
                                                     for k in range(1, 500)])
    return {
        "cell of 10^4 Å": str(CifWriter(huge)),
        "500 sites, every one distinct (bond check on all)": str(CifWriter(copper_supercell(5, jitter=0.15))),
        "near-singular lattice (angles 119.999°)": str(CifWriter(flat)),
        "2048 sites in P1": str(CifWriter(copper_supercell(8))),
        "500 rows in Fm-3m (96,000 images to merge)": many_rows,
        "5 MB of text": "data_x\n" + "_cell_length_a 5\n" * 300_000,
    }


def clumped_p21c_cif(rows: int = 21, spread: float = 0.01, seed: int = 0) -> str:
    """A P2_1/c CIF whose rows all sit near the inversion centre at the origin: its four operators
    pile the 4 × `rows` sites into two clumps (as the CIF of issue 24: a sane 726 Å³ cell, every
    cell check passes, and CHGNet's graph of the clumps took gigabytes)."""
    rng = random.Random(seed)
    species = [("Ba", "Ti", "O", "O")[k % 4] for k in range(rows)]
    counts = {el: 4 * species.count(el) for el in ("Ba", "Ti", "O")}
    formula = " ".join(f"{el}{n}" for el, n in counts.items())
    header = ["data_BaTiO3", "_symmetry_space_group_name_H-M   'P 1 21/c 1'", "_cell_length_a   5.1",
              "_cell_length_b   18.7", "_cell_length_c   7.7", "_cell_angle_alpha   90", "_cell_angle_beta   99.0",
              "_cell_angle_gamma   90", "_symmetry_Int_Tables_number   14", "_chemical_formula_structural   BaTiO3",
              f"_chemical_formula_sum   '{formula}'", "_cell_volume   725.3", "_cell_formula_units_Z   4", "loop_",
              " _symmetry_equiv_pos_site_id", " _symmetry_equiv_pos_as_xyz", "  1  'x, y, z'", "  2  '-x, -y, -z'",
              "  3  '-x, y+1/2, -z+1/2'", "  4  'x, -y+1/2, z+1/2'", "loop_", " _atom_site_type_symbol",
              " _atom_site_label", " _atom_site_symmetry_multiplicity", " _atom_site_fract_x", " _atom_site_fract_y",
              " _atom_site_fract_z", " _atom_site_occupancy"]
    sites = [f"  {el}  {el}{k}  4  " + "  ".join(f"{0.01 + rng.gauss(0, spread):.4f}" for _ in range(3)) + "  1"
             for k, el in enumerate(species)]
    return "\n".join(header + sites) + "\n"


def grid_clump(n: int, spacing: float, cell: float, element: str = "C") -> Structure:
    """n × n × n atoms `spacing` Å apart in one corner of a cubic cell of `cell` Å."""
    coords = [[i * spacing, j * spacing, k * spacing] for i in range(n) for j in range(n) for k in range(n)]
    return Structure(Lattice.cubic(cell), [element] * n ** 3, coords, coords_are_cartesian=True)


def crowded_cifs() -> dict[str, str]:
    """CIFs whose cells are sane but whose atoms overlap, nearly overlap or are packed denser than any
    solid: each must be refused with its reason before CHGNet, spglib or CrystalNN sees it (issue 24)."""
    rocksalt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl", "Na"],
                                         [[0, 0, 0], [0.5, 0.5, 0.5], [0.02, 0, 0]])  # 6 images 0.11 Å around each Na
    return {
        "P2_1/c, 21 rows its operators pile into two clumps": clumped_p21c_cif(),
        "rock salt with 6 more Na 0.11 Å around each Na (Structure.from_spacegroup)": str(CifWriter(rocksalt)),
        "125 atoms 0.55 Å apart in one clump (nearly overlapping)": str(CifWriter(grid_clump(5, 0.55, 12.0))),
        "a 1.3 Å grid of 64 atoms (56 neighbours within 3 Å each)": str(CifWriter(grid_clump(4, 1.3, 5.2))),
        "27 atoms in 27 Å³ (1 atom/Å³)": str(CifWriter(grid_clump(3, 1.0, 3.0))),
        "1,728 atoms 0.55 Å apart in a 40 Å cell": str(CifWriter(grid_clump(12, 0.55, 40.0))),
    }
