"""Byte-level language modelling on text that ships with Python: code, prose, math; OOD word problems."""
from __future__ import annotations

import functools
import random
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import MAX_EVAL_BATCHES, Suite, mix_seed, opt_int

_MAX_BYTES = 1_500_000


@functools.lru_cache(maxsize=None)
def _code_docs() -> tuple[bytes, ...]:
    """Top-level Python standard-library modules, sorted by name (fixed list, one document each)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if len(files) < 20:
        raise UserError(f"the 'code' domain needs the Python standard-library sources, not found in {stdlib}")
    docs, total = [], 0
    for p in files:
        b = p.read_bytes()
        if b in docs:  # an identical module would sit in both splits
            continue
        docs.append(b)
        total += len(b)
        if total > _MAX_BYTES:
            break
    return tuple(docs)


@functools.lru_cache(maxsize=None)
def _prose_docs() -> tuple[bytes, ...]:
    """The English help topics of pydoc (pydoc_data.topics), sorted by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("the 'prose' domain needs pydoc_data (part of the standard library), which is missing") from None
    # some topics share one text (e.g. 'if' and 'else'): keep each text once, or a held-out topic would be trained on
    return tuple(dict.fromkeys(topics[k].encode("utf-8") for k in sorted(topics)))


def _math_docs(seed: int, n: int) -> tuple[bytes, ...]:
    """Generated arithmetic and linear-equation strings."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        kind = r.randrange(5)
        a, b, c = r.randint(0, 99), r.randint(0, 99), r.randint(1, 12)
        if kind == 0:
            s = f"{a}+{b}={a + b}"
        elif kind == 1:
            s = f"{a}-{b}={a - b}"
        elif kind == 2:
            s = f"{a}*{c}={a * c}"
        elif kind == 3:
            x = r.randint(-20, 20)
            s = f"solve {c}x+{a}={c * x + a}: x={x}"
        else:
            s = f"({a}+{b})*{c}={(a + b) * c}"
        out.append((s + "\n").encode())
    return tuple(out)


_NAMES = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo"]
_THINGS = ["apples", "books", "coins", "pens", "shells", "stamps", "cards", "eggs"]


def _wordmath_docs(seed: int, n: int) -> tuple[bytes, ...]:
    """English arithmetic word problems: prose and math composed, a mixture never trained on."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        who, what = r.choice(_NAMES), r.choice(_THINGS)
        a, b = r.randint(1, 60), r.randint(1, 40)
        if r.random() < 0.5:
            s = f"{who} has {a} {what} and gets {b} more. Now {who} has {a + b} {what}.\n"
        else:
            s = f"{who} had {a + b} {what} and gave away {b}. Now {who} has {a} {what}.\n"
        out.append(s.encode())
    return tuple(out)


def lm_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over a (B, T+1) token batch."""
    tok = batch["tokens"]
    logits = model(tok[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1))


class Text(Suite):
    """Domains code / prose / math (trained) and wordmath (OOD), as byte tokens in windows of block_size+1."""

    name = "text"
    domains = ["code", "prose", "math", "wordmath"]
    ood_domains = ["wordmath"]
    SCHEMA = {"block_size": opt_int(2, 1 << 16), "eval_batches": opt_int(1, MAX_EVAL_BATCHES),
              "eval_batch_size": opt_int(1, 1 << 20)}
    ood_description = ("English arithmetic word problems: each trained domain has either the words or the "
                       "arithmetic, none has them composed")

    def __init__(self, seed: int = 0, weights=None, block_size: int = 64, eval_batches: int = 4,
                 eval_batch_size: int = 16):
        if block_size < 2:
            raise UserError("text suite needs block_size >= 2")
        super().__init__(seed, weights, block_size=block_size, eval_batches=eval_batches,
                         eval_batch_size=eval_batch_size)
        self._corpus: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def data_elems(cls, o: dict) -> int:
        return len(cls.domains) * (o.get("eval_batches", 4) * o.get("eval_batch_size", 16)
                                   * (o.get("block_size", 64) + 1) + _MAX_BYTES)

    @classmethod
    def max_batch(cls, o: dict) -> int:
        return o.get("eval_batch_size", 16)

    def _docs(self, domain: str) -> tuple[bytes, ...]:
        if domain == "code":
            return _code_docs()
        if domain == "prose":
            return _prose_docs()
        if domain == "math":
            return _math_docs(mix_seed(self.seed, 21), 40_000)
        return _wordmath_docs(mix_seed(self.seed, 22), 8_000)

    def corpus(self, domain: str, split: str) -> torch.Tensor:
        """The domain's bytes for 'train' or 'eval': every 10th document is held out for evaluation."""
        key = (domain, split)
        if key not in self._corpus:
            docs = self._docs(domain)
            keep = [d for i, d in enumerate(docs) if (i % 10 == 0) == (split == "eval")]
            data = b"\n".join(keep)
            if len(data) < self.options["block_size"] + 2:
                raise UserError(f"domain '{domain}' has too little {split} text for block_size {self.options['block_size']}")
            self._corpus[key] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        return self._corpus[key]

    def _windows(self, data: torch.Tensor, gen: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        T = self.options["block_size"] + 1
        starts = torch.randint(0, len(data) - T, (n,), generator=gen)
        return {"tokens": torch.stack([data[s:s + T] for s in starts.tolist()])}

    def _train_batch(self, domain, gen, batch_size):
        return self._windows(self.corpus(domain, "train"), gen, batch_size)

    def _eval_batches(self, domain, gen):
        data = self.corpus(domain, "eval")
        o = self.options
        return [self._windows(data, gen, o["eval_batch_size"]) for _ in range(o["eval_batches"])]

    loss_fn = staticmethod(lm_loss)

    def default_model(self):
        return "gpt", {"vocab_size": 256, "block_size": self.options["block_size"], "n_layer": 2, "n_head": 2,
                       "n_embd": 64, "dropout": 0.0}
