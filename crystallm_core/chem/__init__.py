"""The chemistry (pymatgen), in four sub-packages that import one way, decoding → judges →
data → cif (checked by import-linter, pyproject.toml):

- `cif`: the CIF language the model writes: format and repair, size limits, Wyckoff tables, prompts;
- `data`: data: training rows, user data sets, the split of each material, the hull reference table;
- `judges`: what a structure is worth: validity checks and their time limits, the isolated
  checker, stability, relaxation, band-gap surrogates, scoring, novelty, metrics;
- `decoding`: constrained decoding: the CIF grammar and program, token constraints, atom
  placement, optional repairs after decoding.

Every sub-package may also import `crystallm_core.lm` and `crystallm_core.paths`, never product or ui.
"""
