"""Instruments for the geometry of multi-domain training: analyzers over an Objective."""
from nexus_opt.errors import UserError

from .objective import TRAIN, Objective
from .result import Result
from .load import load, suite_of
from .gradsim import GradSimResult, gradient_similarity
from .closeness import ClosenessResult, DescentResult, closeness, descend
from .surface import LineResult, SurfaceResult, line, surface
from .flatness import FlatnessReport, FlatnessResult, SpectralDensity, flatness
from .hvp import HessianOperator, curvature_along
from .sources import from_pretrained  # [ownmodel] models trained elsewhere

__all__ = ["Objective", "TRAIN", "Result", "UserError", "load", "suite_of",
           "gradient_similarity", "GradSimResult", "closeness", "descend", "ClosenessResult", "DescentResult",
           "surface", "line", "SurfaceResult", "LineResult",
           "flatness", "FlatnessResult", "FlatnessReport", "SpectralDensity", "HessianOperator", "curvature_along",
           "from_pretrained"]
