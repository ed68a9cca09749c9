"""`landscape train`: train a tiny model on a built-in suite with AdamW or Nexus, writing checkpoints."""
from __future__ import annotations

from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .app import command
from .common import console, merge_alias, out, parse_kv


class _Bar:
    """A rich progress bar fed by the trainer's events; shows a running loss per domain."""

    def __init__(self, progress: Progress):
        self.p, self.task, self.ema, self.started = progress, None, {}, False

    def __call__(self, ev: dict) -> None:
        if not self.started:  # started on the first event: bad input fails before any output but its one line
            self.p.start()
            self.started = True
        if ev["event"] == "step":
            if self.task is None:
                self.task = self.p.add_task("train", total=ev["steps"], completed=ev["step"] - 1, doms="")
            for d, v in ev["micro"]:
                self.ema[d] = v if d not in self.ema else 0.9 * self.ema[d] + 0.1 * v
            doms = " ".join(f"{d}={v:.3f}" for d, v in sorted(self.ema.items()))
            self.p.update(self.task, completed=ev["step"], doms=doms)
        elif ev["event"] == "eval":
            ls = " ".join(f"{d}={v:.3f}" for d, v in ev["losses"].items())
            self.p.console.print(f"[dim]step {ev['step']:>5}[/dim] eval {ls}")


# CLI option -> TrainConfig field, for comparing what was given on --resume with the saved run
_FIELDS = {"suite": "suite", "suite_options": "suite_options", "weights": "weights", "model": "model",
           "model_config": "model_config", "model_factory": "model_factory", "optimizer": "optimizer", "lr": "lr",
           "eps": "eps", "weight_decay": "weight_decay", "inner_lr": "inner_lr", "inner_steps": "accum",
           "accum": "accum", "batch_size": "batch_size", "warmup": "warmup", "min_lr_ratio": "min_lr_ratio",
           "seed": "seed", "eval_every": "eval_every", "ckpt_every": "ckpt_every"}


def given_options(ctx: typer.Context, values: dict) -> dict:
    """The options typed on the command line (not defaults), as TrainConfig fields."""
    try:  # typer vendors its own click
        from typer._click.core import ParameterSource
    except ImportError:  # pragma: no cover
        from click.core import ParameterSource

    res = {}
    for name, field in _FIELDS.items():
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
            res[field] = values[name]
    return res


def locals_for_resume(**kw) -> dict:
    return kw


@command("train")
def train_cmd(
    ctx: typer.Context,
    out_dir: str = typer.Option("runs/default", "--out", help="Run directory (checkpoints + metrics.jsonl)."),
    suite: str = typer.Option("text", help="Built-in suite: text, mix or bowls."),
    suite_options: Optional[str] = typer.Option(None, help="Suite options, e.g. 'block_size=64' or 'dim=2,preset=fig2-sum'."),
    weights: Optional[str] = typer.Option(None, help="Mixture weights, e.g. 'code=1,prose=1,math=2' (default uniform)."),
    model: Optional[str] = typer.Option(None, help="Model: gpt, mlp or point (default: the suite's)."),
    model_config: Optional[str] = typer.Option(None, help="Model config overrides, e.g. 'n_embd=128,n_layer=4'."),
    model_factory: Optional[str] = typer.Option(None, help="A user model 'module:function' (needs --trust-remote-code)."),
    optimizer: str = typer.Option("adamw", help="adamw, nexus, nexus-parallel (Nexus without the walk) or sgd."),
    lr: float = typer.Option(3e-3, help="Peak (outer) learning rate."),
    eps: Optional[float] = typer.Option(None, help="Adam eps (default 1e-8; 1e-10 for Nexus's outer AdamW)."),
    weight_decay: float = typer.Option(0.1, help="Weight decay on matrices (the outer optimizer's)."),
    inner_lr: float = typer.Option(0.01, help="Nexus inner (normalized SGD) learning rate gamma."),
    inner_steps: Optional[int] = typer.Option(None, help="Nexus inner steps K (sets --accum)."),
    steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (default 200; with --resume: "
                                                                  "the saved run's, or more to extend it)."),
    old_steps: Optional[int] = typer.Option(None, "--steps", hidden=True),  # the old spelling of --max-steps
    batch_size: int = typer.Option(16, help="Micro-batch size."),
    accum: int = typer.Option(4, help="Micro-batches per step K (gradient accumulation)."),
    warmup: int = typer.Option(20, help="Linear warmup steps."),
    min_lr_ratio: float = typer.Option(0.1, help="Final lr as a fraction of the peak (cosine)."),
    seed: int = typer.Option(0, help="Seed of the model init, the data and the domain sampler."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    eval_every: int = typer.Option(50, help="Evaluate every N steps."),
    ckpt_every: int = typer.Option(100, help="Checkpoint every N steps (and at the end)."),
    resume_run: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    trust_remote_code: bool = typer.Option(False, help="Allow --model-factory to import code."),
    gradsim_every: int = typer.Option(0, help="Every N optimizer steps, record the domain gradient cosines (with "
                                              "noise floor) on the fixed eval batches in metrics.jsonl (0: off)."),
    allow_large: bool = typer.Option(False, "--allow-large", help="Build models/data beyond this machine's "
                                     "estimated memory (also LANDSCAPE_ALLOW_LARGE=1)."),
):
    """Train on source-pure micro-batches; per-domain eval (OOD included); atomic checkpoints; --resume."""
    bar = _Bar(Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[doms]}"),
                        console=console, transient=False))
    from nexus_opt.train import TrainConfig, resume, train

    steps = merge_alias(steps, old_steps, "steps", "--max-steps", "--steps")

    kv = dict(suite_options=parse_kv(suite_options, "--suite-options"), weights=parse_kv(weights, "--weights") or None,
              model_config=parse_kv(model_config, "--model-config"))
    large = allow_large or None
    from landscape.tracking import tracker_hook  # gradsim rows (kind "gradsim") in metrics.jsonl
    try:
        if resume_run:
            tracker = tracker_hook(gradsim_every, out_dir)
            values = dict(locals_for_resume(suite=suite, model=model, model_factory=model_factory,
                                            optimizer=optimizer, lr=lr, eps=eps, weight_decay=weight_decay,
                                            inner_lr=inner_lr, inner_steps=inner_steps, accum=accum,
                                            batch_size=batch_size, warmup=warmup, min_lr_ratio=min_lr_ratio,
                                            seed=seed, eval_every=eval_every, ckpt_every=ckpt_every), **kv)
            res = resume(out_dir, steps=steps, device=device, progress=bar, trust_remote_code=trust_remote_code,
                         overrides=given_options(ctx, values), allow_large=large,
                         on_step_record=tracker)
        else:
            cfg = TrainConfig(
                suite=suite, suite_options=kv["suite_options"], weights=kv["weights"], model=model,
                model_config=kv["model_config"], model_factory=model_factory,
                optimizer=optimizer, lr=lr, eps=eps, weight_decay=weight_decay, inner_lr=inner_lr,
                steps=200 if steps is None else steps, batch_size=batch_size, accum=accum if inner_steps is None else inner_steps,
                warmup=warmup, min_lr_ratio=min_lr_ratio, seed=seed, device=device, eval_every=eval_every,
                ckpt_every=ckpt_every, out=out_dir)
            tracker = tracker_hook(gradsim_every, out_dir, cfg)
            res = train(cfg, progress=bar, trust_remote_code=trust_remote_code, allow_large=large,
                        on_step_record=tracker)
    finally:
        if bar.started:
            bar.p.stop()
    t = Table(title=f"final per-domain evaluation loss ({res['out']})")
    t.add_column("domain")
    t.add_column("loss", justify="right")
    for d, v in res["losses"].items():
        t.add_row(d, f"{v:.4f}")
    t.add_row("[bold]train (weighted)", f"[bold]{res['train_loss']:.4f}")
    out.print(t)
    console.print(f"checkpoint: {res['checkpoint']}")
    if tracker is not None:
        console.print(f"gradsim: {len(tracker.rows)} rows in metrics.jsonl, {tracker.seconds:.1f} s of measuring")
