"""The training core: source-pure micro-batches, AdamW or Nexus, warmup+cosine, eval, atomic checkpoints, resume.

One optimizer step = K micro-batches (K = gradient accumulation = Nexus inner steps), each drawn from one
domain chosen by the suite's seeded sampler. Every batch and domain choice is a pure function of
(seed, step, micro), so a resumed run repeats the uninterrupted one bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint as ck
from . import limits
from .errors import TrainingDiverged, UserError
from .evaluate import evaluate, move_batch
from .models import REGISTRY, model_from_spec
from .suites import make_suite
from .util import SEED_LIMIT, check_seed, choose, resolve_device  # noqa: F401  (SEED_LIMIT, check_seed re-exported)

OPTIMIZERS = ("adamw", "nexus", "nexus-parallel", "sgd")  # nexus-parallel: Nexus without the walk
MAX_STEPS = 10 ** 9   # steps, eval/checkpoint intervals, warmup
LR_MAX = 1e8          # beyond this a float32 update overflows at once: refused rather than diverging


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run (saved in every checkpoint's manifest)."""

    suite: str = "text"
    suite_options: dict = dataclasses.field(default_factory=dict)
    weights: dict | None = None
    model: str | None = None           # registry name; default: the suite's default model
    model_config: dict = dataclasses.field(default_factory=dict)
    model_factory: str | None = None   # "module:function" of a user model (imports code on load)
    optimizer: str = "adamw"
    lr: float = 3e-3
    betas: tuple = (0.9, 0.95)
    eps: float | None = None           # default 1e-8 for AdamW, 1e-10 for Nexus's outer AdamW (nexus.md)
    weight_decay: float = 0.1
    inner_lr: float = 0.01
    steps: int = 200
    batch_size: int = 16
    accum: int = 4                     # K: micro-batches per optimizer step (= Nexus inner steps)
    warmup: int = 20
    min_lr_ratio: float = 0.1
    seed: int = 0
    device: str = "auto"
    eval_every: int = 50
    ckpt_every: int = 100
    out: str = "runs/default"

    def validate(self) -> "TrainConfig":
        choose(self.optimizer, OPTIMIZERS, "optimizer")
        I, F = limits.check_int, limits.check_float
        for name, hi in (("steps", MAX_STEPS), ("batch_size", 1 << 20), ("accum", 1 << 16),
                         ("eval_every", MAX_STEPS), ("ckpt_every", MAX_STEPS)):
            flag = "--max-steps" if name == "steps" else f"--{name.replace('_', '-')}"  # the CLI's spelling
            setattr(self, name, I(getattr(self, name), flag, 1, hi))
        self.warmup = I(self.warmup, "--warmup", 0, MAX_STEPS)
        for name in ("lr", "inner_lr"):
            setattr(self, name, F(getattr(self, name), f"--{name.replace('_', '-')}", 0.0, LR_MAX, lo_open=True))
        if self.eps is not None:
            self.eps = F(self.eps, "--eps", 0.0, 1.0, lo_open=True)
        self.weight_decay = F(self.weight_decay, "--weight-decay", 0.0, 1e4)
        self.min_lr_ratio = F(self.min_lr_ratio, "--min-lr-ratio", 0.0, 1.0)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise UserError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(F(b, "beta", 0.0, 1.0, hi_open=True) for b in self.betas)
        self.seed = check_seed(self.seed)
        for name in ("suite", "device", "out"):
            if not isinstance(getattr(self, name), str):
                raise UserError(f"--{name} must be a string, got {getattr(self, name)!r}")
        for name in ("model", "model_factory"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise UserError(f"--{name.replace('_', '-')} must be a string, got {getattr(self, name)!r}")
        for name in ("suite_options", "model_config"):
            if not isinstance(getattr(self, name), dict):
                raise UserError(f"--{name.replace('_', '-')} must be key=value pairs, got {getattr(self, name)!r}")
        if self.weights is not None and not isinstance(self.weights, dict):
            raise UserError(f"--weights must be domain=number pairs, got {self.weights!r}")
        return self

    def model_spec(self, suite) -> dict:
        if self.model_factory:
            return {"factory": self.model_factory, "config": dict(self.model_config)}
        name, cfg = suite.default_model()
        if self.model and self.model not in REGISTRY:
            raise UserError(f"unknown model '{self.model}'; choose one of {sorted(REGISTRY)}")
        if self.model and self.model != name:
            raise UserError(f"suite '{suite.name}' trains the '{name}' model; --model {self.model} cannot read its "
                            f"data: leave --model out, or bring your own with --model-factory")
        return {"name": name, "config": {**cfg, **self.model_config}}


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW/SGD with weight decay on matrices only (nanoGPT), or Nexus (nexus-parallel: its first-order control,
    mode="parallel") around that AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    eps = cfg.eps if cfg.eps is not None else (1e-10 if cfg.optimizer.startswith("nexus") else 1e-8)
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=eps)
    if cfg.optimizer == "adamw":
        return adamw
    from .nexus import Nexus

    mode = "parallel" if cfg.optimizer == "nexus-parallel" else "sequential"
    return Nexus(adamw, inner_lr=cfg.inner_lr, inner_steps=cfg.accum, mode=mode)


class _Metrics:
    """Append-only JSON-lines metrics; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except ValueError:
                    break
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(l + "\n" for l in keep))
            tmp.replace(path)
        elif resume_step is None:
            path.write_text("")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _rng_state() -> dict:
    s = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s) -> None:
    """Restore the saved generator states; a malformed state is a UserError, nothing half-restored."""
    ok = isinstance(s, dict) and isinstance(s.get("cpu"), torch.Tensor) and s["cpu"].dtype == torch.uint8 \
        and s["cpu"].dim() == 1
    cuda = s.get("cuda") if isinstance(s, dict) else None
    if ok and cuda is not None:
        ok = isinstance(cuda, (list, tuple)) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                     for t in cuda)
    if not ok:
        raise UserError("the checkpoint's saved random-generator state is malformed; it cannot be resumed")
    before = torch.get_rng_state()
    try:
        torch.set_rng_state(s["cpu"])
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(cuda))
    except (RuntimeError, ValueError, TypeError, IndexError):
        torch.set_rng_state(before)
        raise UserError("the checkpoint's saved random-generator state is malformed; it cannot be resumed") from None


# Options that may differ from the saved run on --resume (they do not change what is computed).
RESUME_FREE = ("out", "device", "steps")


def _same(given, saved) -> bool:
    if isinstance(given, dict) and isinstance(saved, dict):  # key=value overrides: each given key must agree
        return all(k in saved and _same(v, saved[k]) for k, v in given.items())
    if isinstance(given, (list, tuple)) and isinstance(saved, (list, tuple)):
        return len(given) == len(saved) and all(_same(a, b) for a, b in zip(given, saved))
    return given == saved


def _run_dir_of(out: Path) -> Path:
    """--resume's run directory: `out` itself, or the run directory of a checkpoint directory given as --out
    when it is that run's latest checkpoint (else a UserError: resuming there would rewrite later ones)."""
    if not (out / "manifest.json").is_file():
        return out
    run = out.parent
    latest = ck.resolve_checkpoint(run) if ck.list_checkpoints(run) else None
    if latest is not None and latest.resolve() == out.resolve():
        return run
    raise UserError(f"--out {out} is a checkpoint directory, not a run directory, and not its run's latest "
                    f"checkpoint ({latest.name if latest is not None else 'none'}); resume with --out {run}")


def resume(out: str | Path, steps: int | None = None, device: str = "auto",
           progress: Callable[[dict], None] | None = None, trust_remote_code: bool = False,
           overrides: dict | None = None, allow_large: bool | None = None,
           on_step_record: Callable[[int, torch.nn.Module, object], dict | None] | None = None,
           stop_at_loss: float | None = None, stop_when: Callable[[dict], bool] | None = None) -> dict:
    """Continue the run in `out` from its latest checkpoint with its saved config.

    `steps` may extend the run (never shorten it below the saved step count); `overrides` are the other
    options the caller gave explicitly: each must agree with the saved run, else a UserError names the
    saved value (a resumed run keeps its settings). `out` may be the run's latest checkpoint directory.
    """
    run = _run_dir_of(Path(out))
    ckpt = ck.read_checkpoint(run)
    trainer = ckpt.manifest.get("trainer")
    saved = trainer.get("config") if isinstance(trainer, dict) else None
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {ckpt.path} has no usable trainer config; it cannot be resumed")
    saved = dict(saved)
    missing = sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name not in saved and f.name not in ("out", "device"))
    if missing:
        raise UserError(f"checkpoint {ckpt.path} has an incomplete trainer config (missing {missing}); "
                        "it cannot be resumed")
    for k, v in (overrides or {}).items():
        if k in RESUME_FREE:
            continue
        if k not in saved or not _same(v, saved[k]):
            flag = "--" + k.replace("_", "-")
            raise UserError(f"{flag} {v!r} contradicts the saved run ({k}={saved.get(k)!r}); --resume keeps the "
                            f"saved settings: drop {flag}, or start a new run with another --out")
    if steps is not None:
        old = saved.get("steps")
        if isinstance(old, int) and not isinstance(steps, bool) and isinstance(steps, int) and steps < old:
            raise UserError(f"--max-steps {steps} is shorter than the saved run (steps={old}); --resume can only "
                            f"keep or extend it: pass --max-steps {old} or more, or leave --max-steps out")
        saved["steps"] = steps
    saved.update(out=str(run), device=device)
    try:
        cfg = TrainConfig(**saved)
    except TypeError as e:
        raise UserError(f"checkpoint {ckpt.path} has no usable trainer config ({e}); it cannot be resumed") from None
    return train(cfg, progress=progress, trust_remote_code=trust_remote_code, _resume=ckpt, allow_large=allow_large,
                 on_step_record=on_step_record, stop_at_loss=stop_at_loss, stop_when=stop_when)


def _check_base_lrs(v, n_groups: int) -> list:
    if not isinstance(v, (list, tuple)) or len(v) != n_groups:
        raise UserError(f"the checkpoint's saved learning rates do not match the optimizer's {n_groups} group(s)")
    return [limits.check_float(x, "saved base learning rate", 0.0, LR_MAX, lo_open=True) for x in v]


def train(cfg: TrainConfig, progress: Callable[[dict], None] | None = None, trust_remote_code: bool = False,
          on_step: Callable[[int, torch.nn.Module], None] | None = None, _resume: ck.Checkpoint | None = None,
          allow_large: bool | None = None,
          on_step_record: Callable[[int, torch.nn.Module, object], dict | None] | None = None,
          stop_at_loss: float | None = None, stop_when: Callable[[dict], bool] | None = None) -> dict:
    """Train per `cfg` into cfg.out; returns the final eval losses and the last checkpoint's path.

    `stop_when(record)`: evaluate and checkpoint after every step, and stop at the first step whose evaluation
    record (step, losses, train_loss) makes it true (`stopped_at` in the result; used to compare optimizers at
    equal training loss); `stop_at_loss=x` is `stop_when=lambda r: r["train_loss"] <= x`.
    `on_step(step, model)` runs after every optimizer step (the model then holds the outer weights);
    `on_step_record(step, model, optimizer)` too, and a dict it returns is written to metrics.jsonl.
    The run directory is locked for the whole run (one writer at a time, see `checkpoint.RunLock`).
    `allow_large` lifts the size limits of `nexus_opt.limits` (default: LANDSCAPE_ALLOW_LARGE).
    """
    cfg.validate()
    if stop_at_loss is not None:
        if stop_when is not None:
            raise UserError("pass stop_at_loss or stop_when, not both")
        x = float(stop_at_loss)
        stop_when = lambda r: r["train_loss"] <= x  # noqa: E731
    out = Path(cfg.out)
    if _resume is None and (out / "manifest.json").is_file():
        raise UserError(f"--out {out} is a checkpoint directory; choose a new run directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    if cfg.model_factory and not trust_remote_code:
        raise UserError(f"--model-factory '{cfg.model_factory}' imports code; pass --trust-remote-code to allow it")
    device = resolve_device(cfg.device)
    suite = make_suite(cfg.suite, seed=cfg.seed, weights=cfg.weights, options=cfg.suite_options,
                       allow_large=allow_large)
    spec = cfg.model_spec(suite)
    torch.manual_seed(cfg.seed)
    batch = max(cfg.batch_size, type(suite).max_batch(suite.options))
    model = model_from_spec(spec, trust_remote_code=True, batch=batch, allow_large=allow_large,
                            extra_data=type(suite).data_elems(suite.options)).to(device)
    eval_sets = {d: [move_batch(b, device) for b in suite.eval_batches(d)] for d in suite.domains}
    _probe(model, suite, eval_sets)  # everything above is refused before the run directory is touched
    ck.check_closed(out)  # no symlink of the run (its lock, metrics, checkpoints) may lead out of it
    with ck.RunLock(out):
        if _resume is None and ck.list_checkpoints(out):
            raise UserError(f"run directory '{out}' already has checkpoints; pass --resume to continue it or "
                            "choose another --out")
        return _train_locked(cfg, out, device, model, eval_sets, suite, spec, progress, on_step, _resume,
                             on_step_record, stop_when)


def _probe(model, suite, eval_sets) -> None:
    """One evaluation forward before any work: a model that cannot read the suite's data fails in one line."""
    first = eval_sets[suite.domains[0]][0]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            suite.loss_fn(model, first)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        if limits.is_allocation_failure(e):
            raise
        raise UserError(f"the model does not fit the data of suite '{suite.name}': "
                        f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
    finally:
        model.train(training)


def check_optimizer_state(sd, opt, where) -> None:
    """The saved optimizer state against the optimizer it will load into: per-parameter tensors of the parameter's
    shape and a real floating dtype, steps finite integers >= 0 (Nexus: each outer optimizer's state)."""
    if hasattr(opt, "_outers") and isinstance(sd, dict) and isinstance(sd.get("outer"), (list, tuple)):
        for o, osd in zip(opt._outers, sd["outer"]):
            check_optimizer_state(osd, o, where)
        return
    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) or \
            not isinstance(sd.get("param_groups"), (list, tuple)) or len(sd["param_groups"]) != len(opt.param_groups):
        raise UserError(f"cannot resume from {where}: the optimizer state does not match the optimizer's groups")
    params = {}
    for sg, mg in zip(sd["param_groups"], opt.param_groups):
        ids = sg.get("params") if isinstance(sg, dict) else None
        if not isinstance(ids, (list, tuple)) or len(ids) != len(mg["params"]):
            raise UserError(f"cannot resume from {where}: a parameter group of the optimizer state has the wrong size")
        params.update(zip(ids, mg["params"]))
    for pid, st in sd["state"].items():
        if pid not in params or not isinstance(st, dict):
            raise UserError(f"cannot resume from {where}: optimizer state for unknown parameter {str(pid)[:40]!r}")
        p = params[pid]
        for name, t in st.items():
            what = f"cannot resume from {where}: optimizer state '{str(name)[:40]}' of parameter {pid}"
            if name == "step":
                v = t.item() if isinstance(t, torch.Tensor) and t.numel() == 1 else t
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                        or float(v) != int(v):
                    raise UserError(f"{what} is {str(v)[:40]}; a step count is an integer >= 0")
                continue
            if isinstance(t, torch.Tensor):
                if not t.is_floating_point():
                    raise UserError(f"{what} has dtype {str(t.dtype).replace('torch.', '')}; a real floating dtype "
                                    "is expected")
                if t.dim() > 0 and tuple(t.shape) != tuple(p.shape):
                    raise UserError(f"{what} has shape {tuple(t.shape)}, the parameter has {tuple(p.shape)}")


def _train_locked(cfg, out, device, model, eval_sets, suite, spec, progress, on_step, resume_ckpt,
                  on_step_record=None, stop_when=None) -> dict:
    opt = build_optimizer(model, cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    start = 0
    if resume_ckpt is not None:
        try:
            weights = resume_ckpt.model_state()
            state = resume_ckpt.state()
            if not isinstance(state, dict) or not {"optimizer", "rng", "base_lrs"} <= set(state):
                raise UserError(f"cannot resume from {resume_ckpt.path}: its trainer state is incomplete")
            check_optimizer_state(state["optimizer"], opt, resume_ckpt.path)  # before the model is touched
            base_lrs = _check_base_lrs(state["base_lrs"], len(opt.param_groups))
            model.load_state_dict(weights)
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            if limits.is_allocation_failure(e):
                raise
            raise UserError(f"cannot resume from {resume_ckpt.path}: "
                            f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
        _set_rng_state(state["rng"])
        start = resume_ckpt.step
    out.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(out / "metrics.jsonl", start if resume_ckpt is not None else None)
    cfg_json = dataclasses.asdict(cfg)
    cfg_json["betas"] = list(cfg.betas)
    manifest_base = {"model": spec, "suite": suite.spec(), "optimizer": {"name": cfg.optimizer},
                     "trainer": {"config": cfg_json}, "domains": {"train": suite.train_domains,
                                                                  "ood": suite.ood_domains}}
    last_ckpt = str(resume_ckpt.path) if resume_ckpt is not None else None

    def run_eval(step: int, log: bool = True) -> dict:
        losses = evaluate(model, eval_sets, suite.loss_fn)
        bad = next((d for d, v in losses.items() if not math.isfinite(v)), None)
        if bad is not None:  # the weights just stepped to a non-finite loss: never checkpoint them
            raise TrainingDiverged(step, bad, last_ckpt)
        train_loss = sum(suite.weights[d] * losses[d] for d in suite.train_domains)
        rec = {"kind": "eval", "step": step, "losses": losses, "train_loss": train_loss}
        if log:
            metrics.write(rec)
        if progress:
            progress({"event": "eval", **rec})
        return rec

    def save(step: int, rec: dict) -> str:
        state = {"optimizer": opt.state_dict(), "rng": _rng_state(), "base_lrs": base_lrs}
        m = {**manifest_base, "metrics": {"losses": rec["losses"], "train_loss": rec["train_loss"]}}
        path = ck.save_checkpoint(out, step, model, m, state)
        if progress:
            progress({"event": "checkpoint", "step": step, "path": str(path)})
        return str(path)

    if start == 0:
        last_ckpt = save(0, run_eval(0))
    rec = None
    t0 = time.time()
    for step in range(start, cfg.steps):
        f = lr_factor(step, cfg)
        for g, b in zip(opt.param_groups, base_lrs):
            g["lr"] = b * f
        model.train()
        doms, losses = [], []
        for micro in range(cfg.accum):
            d = suite.sample_domain(step, micro)
            batch = move_batch(suite.train_batch(d, step, micro, cfg.batch_size), device)
            loss = suite.loss_fn(model, batch)
            if cfg.optimizer.startswith("nexus"):
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                (loss / cfg.accum).backward()
            doms.append(d)
            losses.append(loss.detach())
        values = torch.stack(losses).tolist()
        for d, v in zip(doms, values):
            if not math.isfinite(v):
                raise TrainingDiverged(step + 1, d, last_ckpt)
        if not cfg.optimizer.startswith("nexus"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        done = step + 1
        if on_step is not None:
            on_step(done, model)
        metrics.write({"kind": "train", "step": done, "lr": base_lrs[0] * f,
                       "micro": [{"domain": d, "loss": v} for d, v in zip(doms, values)]})
        extra = on_step_record(done, model, opt) if on_step_record is not None else None  # e.g. a GradSimTracker
        if extra:
            metrics.write({"step": done, **extra})
        if progress:
            progress({"event": "step", "step": done, "steps": cfg.steps, "micro": list(zip(doms, values)),
                      "elapsed": time.time() - t0})
        is_ckpt = done % cfg.ckpt_every == 0 or done == cfg.steps
        if done % cfg.eval_every == 0 or is_ckpt or stop_when is not None:
            rec = run_eval(done)
        if stop_when is not None:  # every step is a candidate for the closest match: keep each
            last_ckpt = save(done, rec)
            if stop_when(rec):
                return {"losses": rec["losses"], "train_loss": rec["train_loss"], "checkpoint": last_ckpt,
                        "out": str(out), "stopped_at": done}
        if is_ckpt and stop_when is None:
            last_ckpt = save(done, rec)
    if rec is None:  # resumed at or past the last step: already logged, do not log it twice
        rec = run_eval(cfg.steps, log=False)
    return {"losses": rec["losses"], "train_loss": rec["train_loss"], "checkpoint": last_ckpt, "out": str(out)}
