"""The data: training rows prepared from the Materials Project sets (`data_prep`), data sets a
user uploads for fine-tuning (`user_data`), the formula-disjoint splits (`splits`)
and the formation-energy hull of known phases (`hull`), which labels the rows and which the
stability judge reads. May import `chem.cif` (and `crystallm_core.lm`, `crystallm_core.paths`),
never `chem.judges` or `chem.decoding`.
"""
