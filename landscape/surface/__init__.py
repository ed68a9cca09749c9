"""Loss surfaces and lines, split by concern: `results` (SurfaceResult/LineResult and their files), `engine`
(batched or looped evaluation of many points), `resume` (fingerprints, sidecars, sharding over ranks),
`planes` (the plane and its grid) and `api` (`surface()` and `line()`)."""
from .api import line, resolve_domains, surface
from .engine import BATCH_MODES, W_BUDGET_BYTES, Evaluator, choose_batch, default_chunk, probe
from .planes import PLANES, grid_axes, make_plane
from .results import FORMAT, FORMAT_VERSION, LineResult, SurfaceResult, versions
from .resume import dist_info, fingerprint, shard_rows

__all__ = ["surface", "line", "SurfaceResult", "LineResult", "PLANES", "BATCH_MODES", "FORMAT", "FORMAT_VERSION",
           "W_BUDGET_BYTES", "Evaluator", "choose_batch", "default_chunk", "probe", "make_plane", "grid_axes",
           "resolve_domains", "dist_info", "fingerprint", "shard_rows", "versions"]
