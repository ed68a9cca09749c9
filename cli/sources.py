"""Analyse your own model: the options that name a model trained elsewhere and its data files, shared by every
analyzer command, and `load_target`, which loads a run directory or such a model.

`@source_options` (under `@command(...)`) adds --data, --ood, --params, --factory, --factory-config,
--batch-size, --seq-len, --num-batches, --text-field, --data-seed and --loss to a command; `load_target` reads
them. Under torchrun the decorator initialises the process group first and, on ranks other than 0, silences
the tables and sends the outputs to a scratch directory, so only rank 0 prints and writes.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import json
import tempfile
from typing import Optional

import typer

_OPTIONS: contextvars.ContextVar[dict] = contextvars.ContextVar("source_options", default={})

_PARAMS = [
    ("data", Optional[str], typer.Option(None, "--data", help="Your own model's domains: name=path[,name=path...] "
                                                              "(text file, directory, .jsonl, .safetensors/.npz).")),
    ("ood", Optional[str], typer.Option(None, "--ood", help="Out-of-distribution domains, name=path[,...] (marked OOD).")),
    ("params", Optional[str], typer.Option(None, "--params", help="Analyse only parameters whose name matches this "
                                                                  "regex (the others stay fixed).")),
    ("factory", Optional[str], typer.Option(None, "--factory", help="module:function building the model of a "
                                                                    ".safetensors/.pt state dict (needs --trust-remote-code).")),
    ("factory_config", Optional[str], typer.Option(None, "--factory-config", help="JSON keyword arguments of --factory.")),
    ("batch_size", int, typer.Option(8, "--batch-size", help="Sequences (or examples) per batch of a --data domain.")),
    ("seq_len", Optional[int], typer.Option(None, "--seq-len", help="Tokens the model reads per sequence (text "
                                                                    "domains; default 64 or the model's context).")),
    ("num_batches", int, typer.Option(4, "--num-batches", help="Held-out batches per --data domain.")),
    ("text_field", str, typer.Option("text", "--text-field", help="The text field of .jsonl domains.")),
    ("data_seed", int, typer.Option(0, "--data-seed", help="Seed of the held-out windows/examples of --data domains.")),
    ("loss", str, typer.Option("auto", "--loss", help="Loss of a factory model: auto, lm, mse or ce.")),
    ("allow_large", bool, typer.Option(False, "--allow-large", help="Build a model trained elsewhere beyond this "
                                       "machine's estimated memory (also LANDSCAPE_ALLOW_LARGE=1).")),
    ("allow_missing", bool, typer.Option(False, "--allow-missing", help="Analyse a model trained elsewhere even "
                                         "when its weights leave tensors missing (randomly initialised).")),
]
_OUTPUTS = {"json_out": "--json", "csv_out": "--csv", "plot": "--plot"}


def source_options(fn):
    """Add the own-model options to a typer command; they reach `load_target` through a context variable."""
    sig = inspect.signature(fn)
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for n, a, d in _PARAMS]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
              else p for p in sig.parameters.values()]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from nexus_opt.files import check_outputs, reading

        opts = {n: kwargs.pop(n) for n, _, d in _PARAMS if n in kwargs}
        _check_sizes(opts)
        _distributed_outputs(kwargs)
        token = _OPTIONS.set(opts)
        try:
            with reading(command_reads(kwargs, opts)):  # every write of the command is checked against these
                check_outputs({o: kwargs.get(k) for k, o in _OUTPUTS.items()})
                return fn(*args, **kwargs)
        finally:
            _OPTIONS.reset(token)

    wrapper.__signature__ = sig.replace(parameters=params + extra)
    return wrapper


def command_reads(kwargs: dict, opts: dict) -> list[str]:
    """Every path a command reads: its checkpoints (run directories, models), --from files, --data/--ood files."""
    paths = [str(p) for k in ("checkpoints", "from_") for p in (kwargs.get(k) or [])]
    # single-checkpoint arguments (connect's ends A, B and --at); a 'min:DOMAIN' end names no file
    paths += [str(v) for k in ("a", "b", "at") if isinstance(v := kwargs.get(k), str) and not v.startswith("min:")]
    for opt in ("data", "ood"):
        for part in (opts.get(opt) or "").split(","):
            name, eq, path = part.partition("=")
            if eq and path.strip():
                paths.append(path.strip())
    return paths


def _check_sizes(o: dict) -> None:
    """Batch and window sizes are checked when parsed, whether or not --data is given (refused, never ignored)."""
    from nexus_opt.util import check_seed

    from .common import check_range

    check_range(o.get("batch_size"), "--batch-size", 1, 1 << 16, "sequences or examples per batch")
    check_range(o.get("seq_len"), "--seq-len", 1, 1 << 20, "tokens per sequence")
    check_range(o.get("num_batches"), "--num-batches", 1, 1 << 16, "held-out batches per domain")
    if o.get("data_seed") is not None:
        check_seed(o["data_seed"], "--data-seed")


def _distributed_outputs(kwargs: dict) -> None:
    """Under torchrun: initialise the process group; ranks > 0 print nothing and write to a scratch folder."""
    from landscape import distributed

    distributed.init_from_env()
    if distributed.is_main():
        return
    from . import common

    common.out.quiet = common.console.quiet = True
    for k in _OUTPUTS:
        if kwargs.get(k):
            kwargs[k] = None
    if "out_dir" in kwargs:
        kwargs["out_dir"] = tempfile.mkdtemp(prefix="landscape-rank")


def load_target(path: str, device: str = "auto", trust_remote_code: bool = False):
    """A run/checkpoint directory (landscape.load), or a model trained elsewhere (landscape.sources) on the
    --data files; --params restricts either."""
    from landscape import load
    from landscape.data import parse_specs
    from landscape.sources import from_pretrained, is_model_source
    from nexus_opt.errors import UserError

    o = _OPTIONS.get()
    data = parse_specs(o.get("data"), "--data")
    ood = parse_specs(o.get("ood"), "--ood")
    if is_model_source(path):
        if not data:
            raise UserError(f"{path} is a model without data; name its domains with --data name=path[,name=path...]")
        cfg = {}
        if o.get("factory_config"):
            try:
                cfg = json.loads(o["factory_config"])
            except ValueError as e:
                raise UserError(f"--factory-config is not JSON ({e.msg}); e.g. '{{\"n_layer\": 2}}'") from None
            if not isinstance(cfg, dict):
                raise UserError("--factory-config must be a JSON object of keyword arguments")
        return from_pretrained(path, data=data, ood=ood, factory=o.get("factory"), factory_config=cfg,
                               trust_remote_code=trust_remote_code, batch_size=o.get("batch_size", 8),
                               seq_len=o.get("seq_len"), num_batches=o.get("num_batches", 4),
                               seed=o.get("data_seed", 0), text_field=o.get("text_field", "text"),
                               loss=o.get("loss", "auto"), params=o.get("params"), device=device,
                               allow_large=o.get("allow_large") or None, allow_missing=bool(o.get("allow_missing")))
    if data or ood:
        raise UserError(f"--data/--ood are for a model trained elsewhere (an HF directory, .safetensors or .pt); "
                        f"{path} is read as a run directory with its own domains")
    return load(path, device=device, trust_remote_code=trust_remote_code,
                allow_large=o.get("allow_large") or None).select(o.get("params"))
