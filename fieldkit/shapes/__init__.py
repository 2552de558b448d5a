"""Shapes from planar cross-sections: the ``.csl`` format, sampling, meshing, metrics and baselines."""

from fieldkit.shapes.csl import Contour, CrossSections, CSLError, Plane, find_csl, read_csl, write_csl

__all__ = ["Contour", "CrossSections", "CSLError", "Plane", "find_csl", "read_csl", "write_csl"]
