"""Named domains from local files: text files or directories, JSON lines, or tensor files, as fixed batches.

Text (a file, or a directory read recursively, text files only, in sorted order; or `.jsonl` with a text
field) is tokenised with the model's tokenizer when it has one, as UTF-8 bytes otherwise, documents joined
by the tokenizer's end-of-text token (bytes: a newline); `num_batches` batches of `batch_size` windows are
drawn at seeded random starts. Tensor files (`.safetensors` or `.npz`) hold examples under keys `x`/`y` or
`inputs`/`targets` (leading dimension = examples); batches are a seeded permutation of them.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Mapping

import torch

from nexus_opt.errors import UserError

TENSOR_SUFFIXES = (".safetensors", ".npz")
MAX_DIR_FILES = 20000


def parse_specs(text: str | None, option: str) -> dict[str, str]:
    """'code=src/,prose=books.jsonl' -> {'code': 'src/', 'prose': 'books.jsonl'} (names unique, non-empty)."""
    out: dict[str, str] = {}
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, path = part.partition("=")
        name, path = name.strip(), path.strip()
        if not eq or not name or not path:
            from nexus_opt.files import short

            raise UserError(f"{option} must look like name=path[,name=path...], got '{short(text)}'")
        if name in out:
            raise UserError(f"{option} names domain '{name[:200]}' twice")
        out[name] = path
    return out


def _domain_seed(seed: int, name: str) -> torch.Generator:
    from nexus_opt.suites.base import generator
    return generator(int(seed), zlib.crc32(name.encode()))


def _is_text(raw: bytes) -> bool:
    if b"\x00" in raw:
        return False
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def read_documents(path: str | Path, name: str, text_field: str = "text") -> list[str]:
    """The documents of a text source: a text file (one document), a `.jsonl` file (one per line, field
    `text_field`), or a directory (every text file under it, recursively, sorted; binary files skipped)."""
    from nexus_opt.files import max_input_bytes, read_bounded

    p = Path(path)
    cap = max_input_bytes()
    if not p.exists():
        raise UserError(f"domain '{name}': {path} does not exist; give a text file, a .jsonl file or a directory")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in
                                                                          f.relative_to(p).parts))
        if len(files) > MAX_DIR_FILES:
            raise UserError(f"domain '{name}': {path} holds over {MAX_DIR_FILES} files; point at a smaller directory")
        docs, total = [], 0
        for f in files:  # regular files only (is_file): FIFOs and devices in the tree are skipped
            raw = read_bounded(f, f"domain '{name}':", max(cap - total, 0))
            total += len(raw)
            if f.suffix == ".jsonl" and _is_text(raw):
                docs += _jsonl(raw.decode("utf-8"), f, name, text_field)
            elif _is_text(raw) and raw.strip():
                docs.append(raw.decode("utf-8"))
        if not docs:
            raise UserError(f"domain '{name}': {path} holds no non-empty text files")
        return docs
    raw = read_bounded(p, f"domain '{name}':", cap)  # a regular file within the cap: /dev/zero, FIFOs refused
    if not _is_text(raw):
        raise UserError(f"domain '{name}': {path} is not UTF-8 text (binary data?); give a text or .jsonl file, "
                        f"or a {'/'.join(TENSOR_SUFFIXES)} tensor file")
    if p.suffix == ".jsonl":
        docs = _jsonl(raw.decode("utf-8"), p, name, text_field)
    else:
        docs = [raw.decode("utf-8")] if raw.strip() else []
    if not docs:
        raise UserError(f"domain '{name}': {path} is empty")
    return docs


def _jsonl(text: str, path: Path, name: str, field: str) -> list[str]:
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise UserError(f"domain '{name}': {path} line {i} is not JSON ({e.msg}); one JSON object per line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise UserError(f"domain '{name}': {path} line {i} has no string field '{field}'; "
                            "pick the field with --text-field")
        try:
            rec[field].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape (\\ud800) decodes but is no text
            raise UserError(f"domain '{name}': {path} line {i} field '{field}' holds an unpaired surrogate "
                            "(\\ud800-\\udfff escape); it is not valid text") from None
        if rec[field]:
            docs.append(rec[field])
    return docs


def tokenize(docs: list[str], tokenizer=None) -> torch.Tensor:
    """One token stream: the tokenizer's ids (documents joined by its end-of-text token) or UTF-8 bytes."""
    if tokenizer is None:
        return torch.frombuffer(bytearray("\n".join(docs).encode("utf-8")), dtype=torch.uint8).long()
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, d in enumerate(docs):
        if i and eos is not None:
            ids.append(int(eos))
        ids += list(tokenizer(d, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def text_batches(stream: torch.Tensor, name: str, *, batch_size: int, seq_len: int, num_batches: int, seed: int,
                 key: str = "tokens", vocab_size: int | None = None) -> list[dict[str, torch.Tensor]]:
    """`num_batches` batches of `batch_size` windows at seeded random starts. key 'tokens': windows of
    seq_len + 1 (the model reads seq_len, predicts the next of each); 'input_ids': windows of seq_len."""
    L = seq_len + 1 if key == "tokens" else seq_len
    if stream.numel() < L + 1:
        raise UserError(f"domain '{name}' has {stream.numel()} tokens, too few for sequences of {L}; "
                        "lower --seq-len or give more text")
    if vocab_size is not None and stream.numel() and int(stream.max()) >= vocab_size:
        raise UserError(f"domain '{name}' has token id {int(stream.max())} but the model's vocabulary has "
                        f"{vocab_size} entries; use the model's own tokenizer")
    gen = _domain_seed(seed, name)
    starts = torch.randint(0, stream.numel() - L + 1, (num_batches, batch_size), generator=gen)
    return [{key: torch.stack([stream[s:s + L] for s in row.tolist()])} for row in starts]


def tensor_batches(path: str | Path, name: str, *, batch_size: int, num_batches: int, seed: int) -> list[dict]:
    """Batches of examples from a `.safetensors` / `.npz` file with keys x/y or inputs/targets."""
    from nexus_opt.files import check_regular_input, max_input_bytes

    p = Path(path)
    if not p.exists():
        raise UserError(f"domain '{name}': {path} is not a file")
    check_regular_input(p, f"domain '{name}':", max_input_bytes())
    try:
        if p.suffix == ".npz":
            import numpy as np
            with np.load(p, allow_pickle=False) as z:
                data = {k: torch.from_numpy(z[k].copy()) for k in z.files}
        else:
            from safetensors.torch import load_file
            data = load_file(str(p))
    except Exception as e:  # a corrupt or foreign file: one line
        raise UserError(f"domain '{name}': cannot read {path} ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    pair = ("x", "y") if {"x", "y"} <= set(data) else ("inputs", "targets") if {"inputs", "targets"} <= set(data) else None
    if pair is None:
        raise UserError(f"domain '{name}': {path} must hold tensors 'x' and 'y' (or 'inputs' and 'targets'); "
                        f"it has {sorted(data)}")
    x, y = data[pair[0]], data[pair[1]]
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise UserError(f"domain '{name}': {path} '{pair[0]}' and '{pair[1]}' must share a leading (examples) "
                        f"dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    from nexus_opt.checkpoint import check_dtype

    for k, t in ((pair[0], x), (pair[1], y)):
        check_dtype(t, k, f"domain '{name}': {path}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"domain '{name}': {path} tensor '{k}' has non-finite values")
    need = batch_size * num_batches
    if x.shape[0] < need:
        raise UserError(f"domain '{name}': {path} has {x.shape[0]} examples, fewer than --batch-size x "
                        f"--num-batches = {need}; lower them")
    perm = torch.randperm(x.shape[0], generator=_domain_seed(seed, name))[:need].view(num_batches, batch_size)
    return [{pair[0]: x[i], pair[1]: y[i]} for i in perm]


def load_domains(data: Mapping[str, str], ood: Mapping[str, str] | None = None, *, tokenizer=None,
                 vocab_size: int | None = None, context: int | None = None, batch_size: int = 8, seq_len: int = 64,
                 num_batches: int = 4, seed: int = 0, text_field: str = "text",
                 key: str = "tokens") -> tuple[dict[str, list], list[str]]:
    """(domains name -> batches, OOD names) from name -> path mappings; see the module docstring."""
    ood = dict(ood or {})
    both = sorted(set(data) & set(ood))
    if both:
        raise UserError(f"domain(s) {both} given both in --data and --ood; name each once")
    if not data:
        raise UserError("no --data domains given; name at least one trained domain, e.g. --data code=src/")
    for what, v in (("--batch-size", batch_size), ("--num-batches", num_batches), ("--seq-len", seq_len)):
        if int(v) < 1:
            raise UserError(f"{what} must be at least 1, got {v}")
    if key == "tokens" and seq_len < 1 or key == "input_ids" and seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 for next-token prediction, got {seq_len}")
    if context is not None and seq_len > context:
        raise UserError(f"--seq-len {seq_len} is longer than the model's context ({context} tokens); "
                        f"use --seq-len {context} or less")
    if tokenizer is not None and vocab_size is not None and len(tokenizer) > vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab_size}; "
                        "the tokenizer does not belong to this model")
    domains: dict[str, list] = {}
    for name, path in list(data.items()) + list(ood.items()):
        if Path(path).suffix in TENSOR_SUFFIXES:
            domains[name] = tensor_batches(path, name, batch_size=batch_size, num_batches=num_batches, seed=seed)
        else:
            stream = tokenize(read_documents(path, name, text_field), tokenizer)
            domains[name] = text_batches(stream, name, batch_size=batch_size, seq_len=seq_len,
                                         num_batches=num_batches, seed=seed, key=key, vocab_size=vocab_size)
    return domains, list(ood)
