"""What a structure is worth: the validity checks (`validity`) with their time limits and
readable error text (`check_limits`), the isolated checker process (`isolation`), the Explore
page's parse and description (`structure_info`), CHGNet stability and relaxation (`stability`,
`chgnet_features`, `relaxation`), the band-gap surrogates (`surrogates/`), novelty against the
training set (`novelty`), per-run metrics (`metrics`) and the scorer that combines them
(`scoring`). May import `chem.data` and `chem.cif` (and `crystallm_core.lm`,
`crystallm_core.paths`), never `chem.decoding`.
"""
