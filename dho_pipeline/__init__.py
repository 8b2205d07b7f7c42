"""dho-pipeline: distil a zero-shot CLIP teacher into small dual-head CLIP students (DHO).

The library is organised in small modules with one job each; the command line lives in
`stages/` and imports from here, never the other way round.
"""

__version__ = "0.1.0"
