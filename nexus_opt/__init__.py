"""Nexus: an optimizer wrapper that seeks common minima of several domains, plus a small training core."""
__version__ = "0.1.0"

from .errors import TrainingDiverged, UserError  # noqa: E402

__all__ = ["__version__", "UserError", "TrainingDiverged", "Nexus"]


def __getattr__(name):  # torch is imported on first use of Nexus, so `import nexus_opt.errors` stays light
    if name == "Nexus":
        from .nexus import Nexus

        return Nexus
    raise AttributeError(f"module 'nexus_opt' has no attribute {name!r}")
