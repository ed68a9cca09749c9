"""Entry point of the `landscape` console script: imports each command module, then runs the app."""
from __future__ import annotations

# each module registers its command(s) on the app
from . import alignment, closeness, demo, flatness, gradsim, mechanism, study, surface, train  # noqa: F401
from . import connect, sharpness  # noqa: F401  (issue 21: the researcher views)
from .app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
