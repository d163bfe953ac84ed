"""Constrained decoding: the token-level grammar pieces (`grammar`), the CIF grammar of the
training format (`cif_program`), the per-sample state machine the sampler drives
(`constraints`), where atoms may go (`placement`) and the optional repairs after decoding
(`repair`). The top of chem: may import `chem.judges`, `chem.data` and `chem.cif` (and
`crystallm_core.lm`, `crystallm_core.paths`).
"""
