"""Tiny models by registry name: an MLP, a small byte-level GPT (nanoGPT-style) and a Point (bowls)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import limits
from .errors import UserError


class MLP(nn.Module):
    """Fully connected net: in_dim -> [hidden]*depth -> out_dim, tanh or relu."""

    def __init__(self, in_dim: int = 8, hidden: int = 32, depth: int = 2, out_dim: int = 1, activation: str = "tanh"):
        super().__init__()
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in acts:
            raise UserError(f"unknown activation '{activation}'; choose one of {sorted(acts)}")
        dims = [in_dim] + [hidden] * depth
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), acts[activation]()]
        layers.append(nn.Linear(dims[-1], out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Point(nn.Module):
    """A bare parameter vector theta: the 'model' of the quadratic bowls suite."""

    def __init__(self, dim: int = 2, init: list[float] | None = None):
        super().__init__()
        t = torch.zeros(dim) if init is None else torch.tensor(init, dtype=torch.float32)
        if t.shape != (dim,):
            raise UserError(f"Point init has {t.numel()} values but dim is {dim}")
        self.theta = nn.Parameter(t.clone())

    def forward(self, x=None) -> torch.Tensor:
        return self.theta


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """A small byte-level GPT: token + position embeddings, pre-LN blocks, tied output head."""

    def __init__(self, vocab_size: int = 256, block_size: int = 64, n_layer: int = 2, n_head: int = 2,
                 n_embd: int = 64, dropout: float = 0.0):
        super().__init__()
        if n_embd % n_head:
            raise UserError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[-1]
        if T > self.block_size:
            raise UserError(f"sequence length {T} exceeds the model's block_size {self.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


REGISTRY: dict[str, type[nn.Module]] = {"mlp": MLP, "gpt": GPT, "point": Point}

# The schema of each registered model's config: key -> checker (before anything is built).
def _I(v, name, where):
    return limits.check_int(v, name, 1, limits.MAX_DIM, where=where)


def _activation(v, name, where):
    if not isinstance(v, str):
        raise UserError(f"{where}{name} must be a string, got {v!r}")
    return v


def _init_list(v, name, where):
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > limits.MAX_DIM:
        raise UserError(f"{where}{name} must be a list of numbers, got {type(v).__name__}")
    return [limits.check_float(x, f"{name}[{i}]", where=where) for i, x in enumerate(v)]


SCHEMA: dict[str, dict] = {
    "mlp": {"in_dim": _I, "hidden": _I, "depth": lambda v, n, w: limits.check_int(v, n, 0, limits.MAX_DIM, where=w), "out_dim": _I,
            "activation": _activation},
    "gpt": {"vocab_size": _I, "block_size": _I, "n_layer": lambda v, n, w: limits.check_int(v, n, 0, limits.MAX_DIM, where=w), "n_head": _I,
            "n_embd": _I, "dropout": lambda v, n, w: limits.check_float(v, n, 0.0, 1.0, where=w, hi_open=True)},
    "point": {"dim": _I, "init": _init_list},
}


def validate_config(name: str, config) -> dict:
    """The model config checked against its schema: known keys, right types, sane sizes (else a UserError)."""
    if not isinstance(config, dict):
        raise UserError(f"model config must be an object, got {type(config).__name__}")
    schema = SCHEMA[name]
    unknown = sorted(map(str, set(config) - set(schema)))
    if unknown:
        raise UserError(f"unknown config key(s) {unknown} for model '{name}'; known: {sorted(schema)}")
    where = f"model '{name}' config "
    return {k: schema[k](v, k, where) for k, v in config.items()}


def estimate(name: str, config: dict) -> tuple[int, int, int]:
    """(parameters, activation values per example, layers) of a registered model, from its config alone."""
    import inspect

    kw = {k: p.default for k, p in inspect.signature(REGISTRY[name]).parameters.items()}
    kw.update(config)
    if name == "mlp":
        dims = [kw["in_dim"]] + [kw["hidden"]] * kw["depth"]
        params = sum(a * b + b for a, b in zip(dims[:-1], dims[1:])) + dims[-1] * kw["out_dim"] + kw["out_dim"]
        return params, 2 * sum(dims) + kw["out_dim"], kw["depth"]
    if name == "gpt":
        e, T, L, V = kw["n_embd"], kw["block_size"], kw["n_layer"], kw["vocab_size"]
        params = V * e + T * e + L * (12 * e * e + 13 * e) + 2 * e
        acts = T * (L * (20 * e + 2 * kw["n_head"] * T) + 2 * V + 2 * e)
        return params, acts, L
    return kw["dim"], kw["dim"], 0


def build_model(name: str, config: dict | None = None, batch: int = 1, allow_large: bool | None = None,
                extra_data: int = 0) -> nn.Module:
    """Instantiate a registered model from its name and JSON config (validated and sized first).

    `batch` (examples per forward) and `extra_data` (data values held beside it) enter the memory estimate.
    """
    if not isinstance(name, str) or name not in REGISTRY:
        raise UserError(f"unknown model {name!r}; choose one of {sorted(REGISTRY)}")
    config = validate_config(name, config or {})
    params, acts, layers = estimate(name, config)
    limits.check_work(f"model '{name}' {config}", params, acts * max(1, batch), extra_data, allow_large, layers)
    try:
        return REGISTRY[name](**config)
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a negative size: torch raises RuntimeError
        if isinstance(e, RuntimeError) and limits.is_allocation_failure(e):
            raise
        raise UserError(f"bad config for model '{name}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def model_from_spec(spec: dict, trust_remote_code: bool = False, batch: int = 1, allow_large: bool | None = None,
                    extra_data: int = 0) -> nn.Module:
    """Build a model from a manifest spec: {"name", "config"} (registry) or {"factory": "module:function", "config"}.

    A factory imports code, so it runs only with trust_remote_code=True (like a "trust remote code" switch).
    Registered models are validated against their schema and sized (see `nexus_opt.limits`) before building.
    """
    if not isinstance(spec, dict):
        raise UserError("checkpoint model spec is not an object; the manifest is malformed")
    config = spec.get("config") or {}
    if not isinstance(config, dict):
        raise UserError("checkpoint model config is not an object; the manifest is malformed")
    if spec.get("factory"):
        factory = spec["factory"]
        if not isinstance(factory, str):
            raise UserError(f"model factory must be a 'module:function' string, got {factory!r}")
        if not trust_remote_code:
            raise UserError(f"the checkpoint's model comes from the user factory '{factory}', which imports code; "
                            "pass trust_remote_code=True (CLI: --trust-remote-code) if you trust it")
        return _call_factory(factory, config)
    return build_model(spec.get("name", ""), config, batch=batch, allow_large=allow_large, extra_data=extra_data)


def _call_factory(factory: str, config: dict) -> nn.Module:
    import importlib

    mod, _, fn = factory.partition(":")
    if not mod or not fn:
        raise UserError(f"model factory '{factory}' must look like 'module:function'")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import model factory '{factory}': {e}") from None
    try:
        model = f(**config)
    except (TypeError, ValueError, RuntimeError, OverflowError, AssertionError) as e:  # a bad keyword or value
        from .limits import is_allocation_failure

        if is_allocation_failure(e):
            raise
        from .files import short

        raise UserError(f"model factory '{factory}' refused its config {short(config, 120)} "
                        f"({type(e).__name__}: {short(str(e).splitlines()[0] if str(e) else '', 160)}); "
                        "fix --factory-config / the model config") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory '{factory}' returned {type(model).__name__}, not a torch.nn.Module")
    return model
