"""Losses that expose the model output: `outputs(model, batch)` then `from_outputs(out, batch)`.

Gauss-Newton curvature needs the split (J of the outputs, the loss's analytic Hessian in the outputs);
calling one of these objects as `loss(model, batch)` gives the usual mean loss, so they are plain
Objective losses too. `output_loss(fn)` maps the built-in suites' loss functions to their split form.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from nexus_opt.errors import UserError


class OutputLoss:
    """Base: `__call__(model, batch) = from_outputs(outputs(model, batch), batch)`; `hessian_vp(out, u, batch)`
    applies the Hessian of from_outputs w.r.t. the outputs (at `out`) to a tangent u shaped like out."""

    kind = ""

    def outputs(self, model: torch.nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def from_outputs(self, out: torch.Tensor, batch) -> torch.Tensor:
        raise NotImplementedError

    def hessian_vp(self, out: torch.Tensor, u: torch.Tensor, batch) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model: torch.nn.Module, batch) -> torch.Tensor:
        return self.from_outputs(self.outputs(model, batch), batch)


def _ce_hvp(logits: torch.Tensor, u: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(diag(p) - p p^T) u / N per row of (..., V) logits, zero where a target is ignored; N = valid rows."""
    p = torch.softmax(logits.detach(), dim=-1)
    hu = p * u - p * (p * u).sum(-1, keepdim=True)
    n = valid.sum().clamp_min(1)
    return hu * valid.unsqueeze(-1).to(hu.dtype) / n


class TokenCrossEntropy(OutputLoss):
    """Next-token cross-entropy of the built-in text suite: batch {"tokens": (B, T+1)}, outputs (B, T, V) logits."""

    kind = "cross_entropy"

    def outputs(self, model, batch):
        return model(batch["tokens"][:, :-1])

    def from_outputs(self, out, batch):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), batch["tokens"][:, 1:].reshape(-1))

    def hessian_vp(self, out, u, batch):
        return _ce_hvp(out, u, torch.ones(out.shape[:-1], dtype=torch.bool, device=out.device))


class CausalLMLoss(OutputLoss):
    """A Hugging Face causal LM on {"input_ids": (B, T)}: the mean cross-entropy of token t+1 given tokens <= t
    (the model's own label shift, labels = input_ids), ignoring positions whose label is -100."""

    kind = "cross_entropy"

    def outputs(self, model, batch):
        kw = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
        out = model(input_ids=batch["input_ids"], use_cache=False, **kw)
        return (out.logits if hasattr(out, "logits") else out[0])[:, :-1]

    def _labels(self, batch):
        return batch.get("labels", batch["input_ids"])[:, 1:]

    def from_outputs(self, out, batch):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]).float() if out.dtype in (torch.float16, torch.bfloat16)
                               else out.reshape(-1, out.shape[-1]), self._labels(batch).reshape(-1), ignore_index=-100)

    def hessian_vp(self, out, u, batch):
        return _ce_hvp(out, u, self._labels(batch) != -100)


class MeanSquaredError(OutputLoss):
    """Mean squared error of a regression model on {"x", "y"} (the built-in mix suite): outputs model(x)
    squeezed to y's shape; Hessian in the outputs 2/M I for the mean over M entries."""

    kind = "squared_error"

    def outputs(self, model, batch):
        x = batch["x"]
        p = next(model.parameters(), None)
        if p is not None and x.dtype != p.dtype:
            x = x.to(p.dtype)
        return model(x).squeeze(-1)

    def from_outputs(self, out, batch):
        return F.mse_loss(out, batch["y"].to(out.dtype))

    def hessian_vp(self, out, u, batch):
        return u * (2.0 / out.numel())


class ClassCrossEntropy(OutputLoss):
    """Mean cross-entropy of a classifier on {"x", "y"} (or "inputs"/"targets") with integer class targets."""

    kind = "cross_entropy"

    def outputs(self, model, batch):
        x = batch["x"] if "x" in batch else batch["inputs"]
        p = next(model.parameters(), None)
        if p is not None and x.is_floating_point() and x.dtype != p.dtype:
            x = x.to(p.dtype)
        return model(x)

    def _y(self, batch):
        return batch["y"] if "y" in batch else batch["targets"]

    def from_outputs(self, out, batch):
        y = self._y(batch)
        if y.is_floating_point() and not bool((y == y.round()).all()):
            from nexus_opt.errors import UserError

            raise UserError("cross-entropy targets must be integer class labels, got non-integer floats; use "
                            "--loss mse for regression targets")
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1).long(), ignore_index=-100)

    def hessian_vp(self, out, u, batch):
        return _ce_hvp(out, u, self._y(batch).reshape(out.shape[:-1]) != -100)


class TensorMSE(MeanSquaredError):
    """Mean squared error on {"x"|"inputs", "y"|"targets"} (tensor data files), outputs shaped like the target."""

    def outputs(self, model, batch):
        x = batch["x"] if "x" in batch else batch["inputs"]
        p = next(model.parameters(), None)
        if p is not None and x.is_floating_point() and x.dtype != p.dtype:
            x = x.to(p.dtype)
        y = batch["y"] if "y" in batch else batch["targets"]
        return model(x).reshape(y.shape)

    def from_outputs(self, out, batch):
        y = batch["y"] if "y" in batch else batch["targets"]
        return F.mse_loss(out, y.to(out.dtype))


def output_loss(fn: Callable) -> OutputLoss:
    """The split form of a loss: itself if it is an OutputLoss, the built-in suites' losses by identity, else
    a UserError saying why Gauss-Newton curvature is not available."""
    if isinstance(fn, OutputLoss):
        return fn
    from nexus_opt.suites.mix import mse_loss
    from nexus_opt.suites.text import lm_loss

    known = {lm_loss: TokenCrossEntropy, mse_loss: MeanSquaredError}
    for f, cls in known.items():
        if fn is f:
            return cls()
    name = getattr(fn, "__name__", type(fn).__name__)
    raise UserError(f"GGN needs a loss that exposes outputs: '{name}' is a plain callable; use a landscape.losses "
                    "OutputLoss (cross-entropy or squared error), or --curvature hessian")
