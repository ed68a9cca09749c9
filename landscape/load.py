"""Rebuild an Objective (model, domains, loss) from a checkpoint alone.

The trainer's modules (checkpoint format, model registry, suites) are imported inside the functions,
so `import landscape` stays free of the trainer.
"""
from __future__ import annotations

from pathlib import Path

import torch

from nexus_opt.errors import UserError
from nexus_opt.util import move_batch, resolve_device

from .objective import Objective


def check_weights_fit(model: torch.nn.Module, state: dict, where) -> None:
    """Refuse weights that do not fit the model, naming the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f"{what}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}"
             for what, v in (("missing", missing), ("unexpected", extra), ("wrong shape", shape)) if v]
    if parts:
        raise UserError(f"checkpoint weights in {where} do not fit the model ({'; '.join(parts)}); use another checkpoint")


def load(path: str | Path, device: str | torch.device | None = None, trust_remote_code: bool = False,
         allow_large: bool | None = None) -> Objective:
    """The Objective of a checkpoint (a ckpt-* directory, or a run directory -> its latest checkpoint).

    Domains are the suite's fixed evaluation batches (OOD marked); the training loss is the suite's
    mixture over its trained domains. A user model factory named by the manifest is imported only
    with trust_remote_code=True. Nothing is unpickled. Sizes are checked before anything is built
    (`nexus_opt.limits`; `allow_large` lifts them) and non-finite weights are refused.
    `suite_of(obj)` gives the suite back.
    """
    from nexus_opt import checkpoint as ck
    from nexus_opt.models import model_from_spec

    c = ck.read_checkpoint(path)
    m = c.manifest
    dev = resolve_device(device) if isinstance(device, str) else (device or torch.device("cpu"))
    try:
        suite = _make_suite(m["suite"], allow_large=allow_large)
        cls = type(suite)
        model = model_from_spec(m["model"], trust_remote_code=trust_remote_code, batch=cls.max_batch(suite.options),
                                allow_large=allow_large, extra_data=cls.data_elems(suite.options))
    except (KeyError, TypeError) as e:
        raise UserError(f"checkpoint manifest in {c.path} is malformed ({e}); use another checkpoint") from None
    state = c.model_state()
    check_weights_fit(model, state, c.path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint weights in {c.path} do not fit the model: {str(e).splitlines()[0][:200]}") from None
    model.to(dev).eval()
    domains = {d: [move_batch(b, dev) for b in suite.eval_batches(d)] for d in suite.domains}
    meta = {"path": str(c.path), "step": c.step, "suite": m["suite"], "model": m["model"],
            "optimizer": m.get("optimizer", {}), "metrics": m.get("metrics", {}),
            "trainer": m.get("trainer", {}), "package_version": m.get("package_version")}
    return Objective(model, domains, suite.loss_fn, train_domains=suite.train_domains, weights=suite.weights,
                     ood=suite.ood_domains, meta=meta)


def suite_of(obj: Objective):
    """The built-in suite a loaded Objective came from, rebuilt from its `meta["suite"]` spec (the analytic
    truth of the bowls, the training batches of any step): a pure function of the spec, so it matches."""
    spec = obj.meta.get("suite")
    if not isinstance(spec, dict):
        raise UserError("this Objective was not loaded from a checkpoint (its meta has no 'suite' spec); "
                        "build the suite with nexus_opt.suites.make_suite")
    try:
        return _make_suite(spec)
    except (KeyError, TypeError) as e:
        raise UserError(f"the Objective's suite spec is malformed ({e})") from None


def _make_suite(spec: dict, allow_large: bool | None = None):
    from nexus_opt.suites import make_suite

    return make_suite(**{k: spec[k] for k in ("name", "seed", "weights", "options")}, allow_large=allow_large)
