"""Nexus: an optimizer wrapper that seeks common minima of several domains, plus a small training core."""
__version__ = "0.1.0"

from .errors import TrainingDiverged, UserError  # noqa: E402
from .nexus import Nexus  # noqa: E402

__all__ = ["__version__", "UserError", "TrainingDiverged", "Nexus"]
