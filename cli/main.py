"""Entry point of the `landscape` console script: imports each command module, then runs the app."""
from __future__ import annotations

from . import train  # noqa: F401  (each module registers its commands on the app)
from . import gradsim, closeness  # noqa: F401
from . import surface  # noqa: F401
from . import flatness  # noqa: F401
from . import demo  # noqa: F401
from .app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
