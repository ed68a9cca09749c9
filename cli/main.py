"""Entry point of the `landscape` console script: imports each command module, then runs the app."""
from __future__ import annotations

from . import train  # noqa: F401  (each module registers its commands on the app)
from .app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
