"""The CIF language the model reads and writes: the model's CIF form and its repair
(`cif_format`), the size limits applied before any parser runs (`cif_limits`), the Wyckoff
position tables (`wyckoff`) and the prompts that start a generation (`prompts`). The bottom of
chem: it imports no other chem sub-package (only `crystallm_core.lm` and `crystallm_core.paths`).
"""
