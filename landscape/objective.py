"""The Objective: a model, named domains of fixed batches and a loss; the one input of every analyzer."""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch.func import functional_call

from nexus_opt.errors import UserError
from nexus_opt.util import batch_size, domain_loss, move_batch

TRAIN = "train"  # the domain spec meaning "the training loss" (weighted mean over the trained domains)


def batch_seed(seed: int, key: int) -> int:
    """The train-mode RNG seed of the batch with key `key` (Objective.keyed_terms): the one rule every analyzer
    uses, so a batch's dropout masks are a fixed function of (seed, batch) and a train-mode loss is one
    deterministic function of the weights, whatever was evaluated before it."""
    return int(seed) * 1_000_003 + int(key)


def reseed(seed: int, key: int, device=None) -> None:
    """Seed the generators batch `key`'s random ops draw from with batch_seed(seed, key) (seed_generators)."""
    seed_generators(batch_seed(seed, key), device)


def seed_generators(s: int, device=None) -> None:
    """Seed the CPU generator and, for an accelerator `device`, that device's with `s` (other devices'
    generators are left alone: callers fork only these; torch.manual_seed would seed every backend's)."""
    torch.default_generator.manual_seed(s)
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        with torch.cuda.device(dev):
            torch.cuda.manual_seed(s)
    elif dev is not None and dev.type != "cpu":  # another accelerator: its generator, through the global call
        torch.manual_seed(s)


@contextlib.contextmanager
def batch_rng(seed: int | None, key: int, device=None) -> Iterator[None]:
    """Run the block on a forked RNG seeded for batch `key` (`reseed`); the caller's RNG is untouched after.
    `seed` None (eval mode: nothing random to fix) leaves the RNG alone and costs nothing."""
    if seed is None:
        yield
        return
    devices = [device] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        reseed(seed, key, device)
        yield


class _LossModule(torch.nn.Module):
    """Wraps (model, loss_fn) so that `functional_call` can evaluate the loss at any parameters."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


@contextlib.contextmanager
def _restoring(buffers):
    """Copy each (buffer, saved value) back after the block."""
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)


def _check_leading(batch, where: str) -> None:
    """The tensors of a dict/list batch are examples along their leading dimension: they must agree on it."""
    leaves = list(batch.items()) if isinstance(batch, Mapping) else list(enumerate(batch)) \
        if isinstance(batch, (list, tuple)) else []
    dims = {str(k): int(v.shape[0]) for k, v in leaves if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(set(dims.values())) > 1:
        shown = ", ".join(f"{k}: {n}" for k, n in list(dims.items())[:6])
        raise UserError(f"{where}: its tensors disagree on the number of examples (leading dimension: {shown}); "
                        "every tensor of a batch holds the same examples")


class Objective:
    """`Objective(model, domains, loss_fn)`: `domains` maps a name to a fixed sequence of batches and
    `loss_fn(model, batch)` returns the batch's mean loss. A domain's loss is the size-weighted mean
    over its batches; the training loss is the `weights`-weighted mean over `train_domains`
    (default: every domain not in `ood`, uniform)."""

    def __init__(self, model: torch.nn.Module, domains: Mapping[str, Sequence], loss_fn: Callable, *,
                 train_domains: Sequence[str] | None = None, weights: Mapping[str, float] | None = None,
                 ood: Sequence[str] = (), meta: dict | None = None):
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"Objective needs a torch.nn.Module, got {type(model).__name__}")
        if not domains:
            raise UserError("Objective needs at least one domain")
        self.model, self.loss_fn = model, loss_fn
        self.domains = {str(k): list(v) for k, v in domains.items()}
        for d, b in self.domains.items():
            if not b:
                raise UserError(f"domain '{d}' has no batches")
            for i, batch in enumerate(b):
                _check_leading(batch, f"domain '{d}', batch {i}")
        unknown = sorted(set(ood) - set(self.domains))
        if unknown:
            raise UserError(f"ood names unknown domain(s) {unknown}; domains are {list(self.domains)}")
        self.ood = [d for d in self.domains if d in set(ood)]
        if train_domains is None:
            train_domains = [d for d in self.domains if d not in self.ood]
        unknown = sorted(set(train_domains) - set(self.domains))
        if unknown or not train_domains:
            raise UserError(f"train_domains {list(train_domains)} must be a non-empty subset of {list(self.domains)}")
        self.train_domains = list(train_domains)
        from nexus_opt.util import normalize_weights
        self.weights = normalize_weights(self.train_domains, weights)
        self.meta = dict(meta or {})
        self._wrapped = _LossModule(model, loss_fn)

    # -- parameters ----------------------------------------------------------------------------
    def params(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters by name (shared tensors listed once)."""
        return dict(self._named_params())

    def _named_params(self):
        keep = getattr(self, "param_regex", None)  # [ownmodel] set by select(): a parameter subset
        return ((n, p) for n, p in self.model.named_parameters()
                if p.requires_grad and (keep is None or keep.search(n)))

    def _first_param(self) -> torch.nn.Parameter | None:
        """The first trainable parameter (device and dtype read it: no dict of every parameter per read)."""
        return next(self._named_params(), (None, None))[1]

    def select(self, regex: str | None) -> "Objective":  # [ownmodel] parameter subsets (landscape.selection)
        """A view of this objective whose params() are only those whose name matches `regex` (re.search)."""
        from .selection import select
        return select(self, regex)

    @property
    def device(self) -> torch.device:
        p = self._first_param()
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = self._first_param()
        return p.dtype if p is not None else torch.get_default_dtype()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params().values())

    # -- domains -------------------------------------------------------------------------------
    def resolve_domains(self, spec=None, *, default=None, train: str = "loss") -> list[str]:
        """The one parser of domain specs, used by every analyzer. `spec`: None (-> `default`, itself a spec;
        None means 'each'), 'each' (every domain, trained then OOD as declared), 'train' (train='loss': the
        training loss, the pseudo-domain 'train'; train='expand': the trained domains), a domain name, a
        comma-separated string 'a,b', or a list of any of these. Unknown names, repeated names and empty
        selections are a UserError; expansions ('each', 'train') are de-duplicated."""
        if train not in ("loss", "expand"):
            raise ValueError(f"train must be 'loss' or 'expand', got {train!r}")
        if spec is None:
            spec = "each" if default is None else default
        if isinstance(spec, str):
            items = [s.strip() for s in spec.split(",")] if "," in spec else [spec.strip()]
            items = [s for s in items if s]
        else:
            try:
                items = [str(s).strip() for s in spec]
            except TypeError:
                raise UserError(f"domains must be a name, a list of names, 'train' or 'each', got {spec!r}") from None
        if not items:
            raise UserError("no domains selected; name at least one, 'train' or 'each'")
        if len(set(items)) != len(items):
            raise UserError(f"domains must be distinct, got {items}")
        names: list[str] = []
        for s in items:
            if s == "each":
                names += list(self.domains)
            elif s == TRAIN:
                names += [TRAIN] if train == "loss" else self.train_domains
            elif s in self.domains:
                names.append(s)
            else:
                raise UserError(f"unknown domain '{s}'; choose 'train', 'each' or one of {list(self.domains)}")
        return list(dict.fromkeys(names))

    def resolve(self, domain: str | None) -> list[str]:
        """Domain names for a spec, 'train' (or None) meaning the training loss: resolve_domains(domain, default='train')."""
        return self.resolve_domains(domain, default=TRAIN)

    def terms(self, domain: str | None = None) -> list[tuple[float, object]]:
        """(coefficient, batch) pairs whose weighted sum of batch losses is the domain's loss."""
        return [(c, b) for _, c, b in self.keyed_terms(domain)]

    def keyed_terms(self, domain: str | None = None) -> list[tuple[int, float, object]]:
        """terms() with each batch's key: its position among all the objective's batches (domains in order), the
        same whether a domain's loss or the training loss reaches it; train mode seeds that batch's RNG from it."""
        names = self.resolve(domain)
        if names != [TRAIN] and len(names) != 1:
            raise UserError("terms() takes one domain, not 'each'")
        if names == [TRAIN]:
            return [(k, self.weights[d] * c, b) for d in self.train_domains for k, c, b in self.keyed_terms(d)]
        offset = 0
        for d, bs in self.domains.items():
            if d == names[0]:
                break
            offset += len(bs)
        bs = self.domains[names[0]]
        n = sum(batch_size(b) for b in bs)
        return [(offset + i, batch_size(b) / n, b) for i, b in enumerate(bs)]

    # -- evaluation ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluating(self, train_mode: bool = False) -> Iterator["Objective"]:
        """Put the model in eval (or train) mode for the block and restore every module's flag after."""
        flags = [m.training for m in self.model.modules()]
        self.model.train(train_mode)
        try:
            yield self
        finally:
            for m, f in zip(self.model.modules(), flags):
                m.training = f

    @contextlib.contextmanager
    def preserved(self, train_mode: bool = False, seed: int | None = 0) -> Iterator["Objective"]:
        """`evaluating(train_mode)` plus the buffers (e.g. BatchNorm statistics) and the RNG as they were, whatever
        the block does; the block runs with the RNG seeded by `seed` (None: not reseeded)."""
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        device = self.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.evaluating(train_mode), _restoring(buffers):
            if seed is not None:
                seed_generators(seed, device)  # the generators forked, no others
            yield self

    def loss(self, domain: str | None = None) -> float:
        """A domain's loss, or the training loss (domain None or 'train'), in eval mode."""
        with self.evaluating():
            names = self.resolve(domain)
            if names == [TRAIN]:
                return sum(self.weights[d] * domain_loss(self.model, self.domains[d], self.loss_fn)
                           for d in self.train_domains)
            return domain_loss(self.model, self.domains[names[0]], self.loss_fn)

    def losses(self) -> dict[str, float]:
        """Every domain's loss plus 'train' (the weighted training loss)."""
        with self.evaluating():
            out = {d: domain_loss(self.model, b, self.loss_fn) for d, b in self.domains.items()}
        out[TRAIN] = sum(self.weights[d] * out[d] for d in self.train_domains)
        return out

    def functional_loss(self, params: Mapping[str, torch.Tensor], batch) -> torch.Tensor:
        """The batch loss with the model's parameters replaced by `params` (name -> tensor); no mutation."""
        return functional_call(self._wrapped, {"model." + k: v for k, v in params.items()}, (batch,),
                               tie_weights=True, strict=False)

    def validate(self, domains=None, train_mode: bool = False) -> None:
        """Refuse a bad loss before any work: evaluate each batch's loss once (one forward and backward) and
        raise UserError naming the domain and batch index if it is not a finite scalar that depends on the
        trainable parameters. `domains`: None/'each' (every domain), 'train' (the trained ones), a name or a
        list. The model's mode flags, RNG and .grad fields are left as they were."""
        names = [d for d in self.resolve_domains(domains, default="each", train="expand")]
        params = list(self.params().values())
        if not params:
            raise UserError("the model has no trainable parameters (requires_grad=True); nothing to analyse")
        with self.preserved(train_mode, seed=None):
            for d in names:
                for i, batch in enumerate(self.domains[d]):
                    where = f"domain '{d}', batch {i}"
                    loss = self.checked_loss(batch, where)
                    value = float(loss.detach().reshape(()))
                    self.check_gradients(torch.autograd.grad(loss.reshape(()), params, allow_unused=True), where)
                    if i == 0 and not train_mode:  # eval mode promises one function of the weights: check it
                        self.check_deterministic(batch, value, where)

    def checked_loss(self, batch, where: str) -> torch.Tensor:
        """loss_fn(model, batch), or a one-line UserError naming `where` if it fails or is not a finite real
        scalar that depends on the trainable parameters (the per-batch half of `validate`)."""
        try:
            loss = self.loss_fn(self.model, batch)
        except UserError:
            raise
        except Exception as e:  # the user's loss_fn itself fails: say where, in one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(f"the loss failed on {where}: {type(e).__name__}: {msg}") from None
        if not isinstance(loss, torch.Tensor):
            raise UserError(f"the loss on {where} is a {type(loss).__name__}, not a tensor; loss_fn "
                            "must return a scalar tensor built from the model's output")
        if loss.is_complex() or not (loss.is_floating_point()):
            raise UserError(f"the loss on {where} has dtype {str(loss.dtype).replace('torch.', '')}; "
                            "a loss must be a real floating-point scalar")
        if loss.numel() != 1:
            raise UserError(f"the loss on {where} has shape {tuple(loss.shape)}, not a scalar; reduce "
                            "it in loss_fn (e.g. reduction='mean')")
        value = float(loss.detach().reshape(()))
        if not torch.isfinite(torch.tensor(value)):
            raise UserError(f"the loss on {where} is {value}; fix the model, data or loss_fn before "
                            "analysing it")
        if not loss.requires_grad or loss.grad_fn is None:
            raise UserError(f"the loss on {where} does not depend on the trainable parameters (no "
                            "gradient); build it from the model's output")
        return loss.reshape(())

    @staticmethod
    def check_gradients(grads, where: str, finite: bool = True) -> None:
        """UserError unless some gradient exists and (`finite`) every one is finite (a caller that squares the
        gradient anyway may check its squared norm instead: Objective.not_finite)."""
        if all(g is None for g in grads):
            raise UserError(f"the loss on {where} does not depend on the trainable parameters; build "
                            "it from the model's output")
        if finite and any(g is not None and not bool(torch.isfinite(g).all()) for g in grads):
            raise Objective.not_finite(where)

    @staticmethod
    def not_finite(where: str) -> UserError:
        return UserError(f"the loss gradient on {where} is not finite; fix the model, data or loss_fn before "
                         "analysing it")

    def check_deterministic(self, batch, value: float, where: str) -> None:
        """Evaluate the batch's loss again (no gradient): UserError if it disagrees with `value`, its loss from
        an earlier evaluation, beyond rounding (an eval forward that is not one function of the weights)."""
        with torch.no_grad():
            again = float(self.loss_fn(self.model, batch).detach().reshape(()))
        if abs(again - value) > 1e-5 * max(1.0, abs(value)):
            raise UserError(f"two evaluations of the same batch disagree on {where} ({value:.6g} vs "
                            f"{again:.6g}): the model's eval forward is not deterministic (dropout or "
                            "random ops left on?); make it deterministic, or use train mode with a seed")

    # -- copies --------------------------------------------------------------------------------
    def to(self, device=None, dtype: torch.dtype | None = None) -> "Objective":
        """A copy with the model (deep-copied) and batches on `device` in `dtype`; self is unchanged."""
        model = copy.deepcopy(self.model).to(device=device, dtype=dtype)
        doms = {d: [move_batch(b, device, dtype) for b in bs] for d, bs in self.domains.items()}
        out = Objective(model, doms, self.loss_fn, train_domains=self.train_domains, weights=self.weights,
                        ood=self.ood, meta=self.meta)
        out.param_regex = getattr(self, "param_regex", None)  # [ownmodel] keep the parameter subset
        return out
