"""Instruments for the geometry of multi-domain training: analyzers over an Objective."""
from nexus_opt.errors import UserError

from .objective import TRAIN, Objective
from .result import Result
from .load import load, suite_of
from .gradsim import GradSimResult, gradient_similarity
from .closeness import ClosenessResult, closeness
from .alignment import AlignmentResult, alignment
from .descent import DescentResult, descend
from .surface import LineResult, SurfaceResult, line, surface
from .flatness import DomainCurvature, FlatnessResult, SpectralDensity, flatness
from .eigen import EigenResult, RitzPairs
from .gradients import domain_gradient
from .hvp import CurvatureOperator, HessianOperator, curvature_along
from .ggn import GGNOperator
from .tracking import GradSimTracker
from .sources import from_pretrained  # models trained elsewhere (HF directories, safetensors, state dicts)
from .sharpness import DomainSharpness, SharpnessResult, sharpness  # issue 21: researcher views
from .connect import ConnectResult, connect

__all__ = ["Objective", "TRAIN", "Result", "UserError", "load", "suite_of",
           "gradient_similarity", "GradSimResult", "alignment", "AlignmentResult", "closeness", "descend", "ClosenessResult", "DescentResult",
           "surface", "line", "SurfaceResult", "LineResult",
           "flatness", "FlatnessResult", "DomainCurvature", "SpectralDensity", "EigenResult", "RitzPairs",
           "domain_gradient", "CurvatureOperator", "HessianOperator", "GGNOperator", "curvature_along",
           "GradSimTracker", "from_pretrained", "sharpness", "SharpnessResult", "DomainSharpness",
           "connect", "ConnectResult"]
