"""Instruments for the geometry of multi-domain training: analyzers over an Objective."""
from nexus_opt.errors import UserError

from .objective import TRAIN, Objective
from .result import Result
from .load import load

__all__ = ["Objective", "TRAIN", "Result", "UserError", "load"]
