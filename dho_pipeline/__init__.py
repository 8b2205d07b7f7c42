"""dho-pipeline: distil a zero-shot CLIP teacher into small dual-head CLIP students (DHO).

The library is organised in small modules with one job each; the command line lives in
`stages/` and imports from here, never the other way round.

`from dho_pipeline import load_student` is the Python API (dho_pipeline.classifier): it is imported on
first use, so that importing the package stays light (no torch).
"""

__version__ = "0.1.0"
__all__ = ["load_student"]


def __getattr__(name: str):
    if name == "load_student":
        from .classifier import load_student

        return load_student
    raise AttributeError(f"module 'dho_pipeline' has no attribute {name!r}")
