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
from .errors import TrainingDiverged, UserError
from .evaluate import evaluate, move_batch
from .models import model_from_spec
from .suites import make_suite
from .util import SEED_LIMIT, check_seed, resolve_device  # noqa: F401  (re-exported: their home is util)

OPTIMIZERS = ("adamw", "nexus", "nexus-parallel", "sgd")  # nexus-parallel: Nexus without the walk


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
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer '{self.optimizer}'; choose one of {list(OPTIMIZERS)}")
        for name in ("steps", "batch_size", "accum", "eval_every", "ckpt_every"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "inner_lr"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("--warmup must be >= 0 and --min-lr-ratio in [0, 1]")
        self.seed = check_seed(self.seed)
        self.betas = tuple(self.betas)
        return self

    def model_spec(self, suite) -> dict:
        if self.model_factory:
            return {"factory": self.model_factory, "config": dict(self.model_config)}
        name, cfg = suite.default_model()
        if self.model and self.model != name:
            name, cfg = self.model, {}
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


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(s["cuda"]))


def resume(out: str | Path, steps: int | None = None, device: str = "auto",
           progress: Callable[[dict], None] | None = None, trust_remote_code: bool = False,
           on_step_record: Callable[[int, torch.nn.Module, object], dict | None] | None = None) -> dict:
    """Continue the run in `out` from its latest checkpoint with its saved config (optionally more steps)."""
    ckpt = ck.read_checkpoint(out)
    try:
        saved = dict(ckpt.manifest["trainer"]["config"])
        saved.update(out=str(out), device=device, steps=int(steps or saved["steps"]))
        cfg = TrainConfig(**saved)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt.path} has no usable trainer config ({e}); it cannot be resumed") from None
    return train(cfg, progress=progress, trust_remote_code=trust_remote_code, _resume=ckpt,
                 on_step_record=on_step_record)


def train(cfg: TrainConfig, progress: Callable[[dict], None] | None = None, trust_remote_code: bool = False,
          on_step: Callable[[int, torch.nn.Module], None] | None = None, _resume: ck.Checkpoint | None = None,
          on_step_record: Callable[[int, torch.nn.Module, object], dict | None] | None = None) -> dict:
    """Train per `cfg` into cfg.out; returns the final eval losses and the last checkpoint's path.

    `on_step(step, model)` runs after every optimizer step (the model then holds the outer weights);
    `on_step_record(step, model, optimizer)` too, and a dict it returns is written to metrics.jsonl.
    """
    out = Path(cfg.out)
    resume_ckpt = _resume
    if resume_ckpt is None and out.exists() and ck.list_checkpoints(out):
        raise UserError(f"run directory '{out}' already has checkpoints; pass --resume to continue it or choose another --out")
    cfg.validate()
    if cfg.model_factory and not trust_remote_code:
        raise UserError(f"--model-factory '{cfg.model_factory}' imports code; pass --trust-remote-code to allow it")
    device = resolve_device(cfg.device)
    suite = make_suite(cfg.suite, seed=cfg.seed, weights=cfg.weights, options=cfg.suite_options)
    spec = cfg.model_spec(suite)
    torch.manual_seed(cfg.seed)
    model = model_from_spec(spec, trust_remote_code=True).to(device)
    opt = build_optimizer(model, cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    start = 0
    if resume_ckpt is not None:
        try:
            model.load_state_dict(resume_ckpt.model_state())
            state = resume_ckpt.state()
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"cannot resume from {resume_ckpt.path}: {str(e).splitlines()[0]}") from None
        _set_rng_state(state["rng"])
        base_lrs = list(state["base_lrs"])
        start = resume_ckpt.step
    out.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(out / "metrics.jsonl", start if resume_ckpt is not None else None)
    eval_sets = {d: [move_batch(b, device) for b in suite.eval_batches(d)] for d in suite.domains}
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
        if done % cfg.eval_every == 0 or is_ckpt:
            rec = run_eval(done)
        if is_ckpt:
            last_ckpt = save(done, rec)
    if rec is None:  # resumed at or past the last step: already logged, do not log it twice
        rec = run_eval(cfg.steps, log=False)
    return {"losses": rec["losses"], "train_loss": rec["train_loss"], "checkpoint": last_ckpt, "out": str(out)}
