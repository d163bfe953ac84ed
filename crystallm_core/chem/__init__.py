"""The chemistry: CIF format, validity, symmetry, constrained decoding, stability, surrogates, metrics (pymatgen)."""
