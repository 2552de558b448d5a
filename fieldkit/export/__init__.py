"""Writers and readers for splat files: Inria 3DGS .ply, PlayCanvas compressed .ply (read), .splat."""

from fieldkit.export.ply import SplatFormatError, inria_property_names, read_ply, write_ply
from fieldkit.export.splat import read_splat, write_splat

__all__ = [
    "SplatFormatError",
    "inria_property_names",
    "read_ply",
    "read_splat",
    "write_ply",
    "write_splat",
]
