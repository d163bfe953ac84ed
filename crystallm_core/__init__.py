"""CrystaLLM Studio core: CIF language, PKV model, sampler, validity, surrogates, metrics.

Kept free of imports so that light entry points (e.g. GPU training scripts without pymatgen)
can import submodules without pulling in the whole stack.
"""

__version__ = "0.1.0"
