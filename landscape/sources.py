"""Models trained elsewhere: a Hugging Face `save_pretrained` directory, a `.safetensors` file or a `torch.save`
state dict (+ a `module:function` factory), turned into an Objective over domains read from local files."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from nexus_opt.errors import UserError

from .objective import Objective

STATE_SUFFIXES = (".pt", ".pth", ".bin")
# How to get the hf extra (the package is installed from its repository, not from a package index).
HF_INSTALL = ("install it from the nexus-landscape checkout with scripts/setup.sh --hf "
              "(or pip install -e '.[hf]' there)")


def is_model_source(path: str | Path) -> bool:
    """True for what from_pretrained reads (an HF directory with config.json, a .safetensors / .pt file)."""
    p = Path(path)
    return (p.is_dir() and (p / "config.json").is_file()) or (not p.is_dir() and p.suffix in (".safetensors",) + STATE_SUFFIXES)


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("reading a Hugging Face directory needs the 'transformers' package (the hf extra); "
                        f"{HF_INSTALL}") from None
    import transformers
    return transformers


# Size fields of a Hugging Face config (the first present of each group is used): width, depth, heads,
# vocabulary, context, feed-forward width. Each must be a positive integer where given.
_HF_FIELDS = {"width": ("n_embd", "hidden_size", "d_model"), "layers": ("n_layer", "num_hidden_layers", "num_layers"),
              "heads": ("n_head", "num_attention_heads"), "vocab": ("vocab_size",),
              "context": ("n_positions", "max_position_embeddings"), "ffn": ("n_inner", "intermediate_size")}
MAX_CONFIG_BYTES = 1 << 20


def check_hf_config(path: str | Path, allow_large: bool | None = None) -> dict:
    """The config.json of an HF directory, validated (positive integers where sizes belong) and sized with
    nexus_opt.limits' estimate before anything is built; `allow_large` lifts the size limit."""
    import json

    from nexus_opt.files import read_bounded
    from nexus_opt.limits import MAX_DIM, check_int, check_work

    f = Path(path) / "config.json"
    try:
        cfg = json.loads(read_bounded(f, "config", MAX_CONFIG_BYTES).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{f} is not a JSON config ({type(e).__name__}); re-save the model with save_pretrained") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{f} is not a JSON object; re-save the model with save_pretrained")
    sizes = {}
    for what, keys in _HF_FIELDS.items():
        for k in keys:
            if cfg.get(k) is not None:
                sizes[what] = check_int(cfg[k], k, 1, MAX_DIM, where=f"{f}: ")
                break
    d, L = sizes.get("width", 0), sizes.get("layers", 0)
    if "heads" in sizes and d and d % sizes["heads"]:
        raise UserError(f"{f}: the width ({d}) is not a multiple of the number of heads ({sizes['heads']})")
    ffn = sizes.get("ffn", 4 * d)
    n = sizes.get("vocab", 0) * d + sizes.get("context", 0) * d + L * (4 * d * d + 2 * d * ffn + 8 * d)
    check_work(f"the model in {path}", n, act_elems=L * sizes.get("context", 0) * (d + ffn), allow_large=allow_large,
               layers=L)
    return cfg


def load_hf(path: str | Path, trust_remote_code: bool = False, allow_large: bool | None = None,
            allow_missing: bool = False):
    """(model, tokenizer or None) from a save_pretrained causal-LM directory: safetensors weights only, local
    files only, eager attention (double backward), float32. The config is sized first; weights that leave a
    parameter missing or unexpected are refused, naming the tensors, unless `allow_missing` (random values)."""
    tf = _require_transformers()
    tf.utils.logging.disable_progress_bar()  # no loading bars on stderr: the CLI's own output stays clean
    p = Path(path)
    if not any(p.glob("*.safetensors")):
        raise UserError(f"{path} has no .safetensors weights (a pickle such as pytorch_model.bin is never loaded); "
                        "re-save the model with save_pretrained(..., safe_serialization=True)")
    check_hf_config(p, allow_large)
    level = tf.utils.logging.get_verbosity()
    tf.utils.logging.set_verbosity_error()  # the load report is ours to give, in one line
    try:
        model, info = tf.AutoModelForCausalLM.from_pretrained(
            str(p), use_safetensors=True, local_files_only=True, trust_remote_code=trust_remote_code,
            attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{path} needs its own model code; pass --trust-remote-code (trust_remote_code=True) "
                            "if you trust it") from None
        raise UserError(f"cannot load a causal LM from {path}: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 -- safetensors' own errors (garbage, truncated), torch's, transformers'
        from nexus_opt.limits import is_allocation_failure

        if is_allocation_failure(e) or isinstance(e, UserError):
            raise
        raise UserError(f"cannot load a causal LM from {path}: {_one_line(e)}") from None
    finally:
        tf.utils.logging.set_verbosity(level)
    bad = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()) and not allow_missing:
        parts = [f"{k.split('_')[0]} {_few([str(x) for x in v])}" for k, v in bad.items() if v]
        raise UserError(f"the weights in {path} do not fit its config ({'; '.join(parts)}); a model with randomly "
                        "initialised tensors would be analysed: fix the files, or pass --allow-missing if you mean it")
    _check_finite(model.state_dict(), path)
    tok = None
    if any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        try:
            tok = tf.AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot load the tokenizer in {path}: {_one_line(e)}") from None
    return model.eval(), tok


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch.save file read with weights_only=True (never unpickled)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path} does not exist; give a .safetensors file, a torch.save state dict or an HF directory")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(p))
        except Exception as e:  # a truncated or foreign file
            raise UserError(f"{path} is not a readable safetensors file ({_one_line(e)})") from None
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for arbitrary objects, RuntimeError for corrupt files
            raise UserError(f"{path} is not a plain state dict that loads with weights_only=True "
                            f"({_one_line(e)[:120]}); save model.state_dict() or use safetensors") from None
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"{path} does not hold a state dict (name -> tensor); save model.state_dict()")
    return dict(state)


def _few(ks: list[str], n: int = 5) -> str:
    return ", ".join(k[:80] for k in ks[:n]) + (f" (+{len(ks) - n} more)" if len(ks) > n else "")


def _check_finite(state: Mapping[str, torch.Tensor], path) -> None:
    from nexus_opt.checkpoint import check_dtype

    for k, v in state.items():
        check_dtype(v, k, path)
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(f"{path}: tensor '{k}' has non-finite values (NaN or inf); use a healthy checkpoint")


def load_factory_model(path: str | Path, factory: str | None, config: dict | None = None,
                       trust_remote_code: bool = False, allow_missing: bool = False) -> torch.nn.Module:
    """A model built by `factory` ('module:function', imported only with trust_remote_code) holding the
    weights of `path`; missing or unexpected keys are named."""
    from nexus_opt.models import model_from_spec

    state = read_state(path)
    if not factory:
        raise UserError(f"{path} holds bare weights; name the code that builds the model with --factory module:function")
    model = model_from_spec({"factory": factory, "config": config or {}}, trust_remote_code=trust_remote_code)
    own = model.state_dict(keep_vars=True)
    by_storage: dict = {}
    for k, v in own.items():  # tied tensors (e.g. a shared embedding and output head) need one copy only
        by_storage.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    tied = {k: ks for ks in by_storage.values() if len(ks) > 1 for k in ks}
    missing = [k for k in own if k not in state and not any(t in state for t in tied.get(k, ()))]
    unexpected = [k for k in state if k not in own]
    if (missing or unexpected) and not allow_missing:
        def few(ks):
            return ", ".join(ks[:5]) + (f" (+{len(ks) - 5} more)" if len(ks) > 5 else "")
        parts = ([f"missing {few(missing)}"] if missing else []) + ([f"unexpected {few(unexpected)}"] if unexpected else [])
        raise UserError(f"{path} does not fit the model of '{factory}': {'; '.join(parts)} (--allow-missing "
                        "keeps the model's own values for missing tensors)")
    state = {k: v for k, v in state.items() if k in own}
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"{path}: tensor '{k}' has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)}")
    _check_finite(state, path)
    model.load_state_dict(state, strict=False)  # every key checked above; a tied alias may be absent
    return model.eval()


def _context(model) -> int | None:
    cfg = getattr(model, "config", None)
    for k in ("n_positions", "max_position_embeddings"):
        v = getattr(cfg, k, None)
        if isinstance(v, int):
            return v
    v = getattr(model, "block_size", None)
    return v if isinstance(v, int) else None


def _vocab(model) -> int | None:
    try:
        emb = model.get_input_embeddings()
        return int(emb.num_embeddings)
    except (AttributeError, NotImplementedError):
        pass
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            return int(m.num_embeddings)
    return None


def from_pretrained(path: str | Path, *, data: Mapping[str, str], ood: Mapping[str, str] | None = None,
                    factory: str | None = None, factory_config: dict | None = None, trust_remote_code: bool = False,
                    batch_size: int = 8, seq_len: int | None = None, num_batches: int = 4, seed: int = 0,
                    text_field: str = "text", loss: str = "auto", params: str | None = None,
                    device=None, allow_large: bool | None = None, allow_missing: bool = False) -> Objective:
    """The Objective of a model trained elsewhere on named file domains (see landscape.data).

    `path`: a Hugging Face causal-LM directory (loss: next-token cross-entropy with the model's own label
    shift), or a `.safetensors` / `torch.save` state dict plus `factory`. For factory models the loss is
    `loss`: 'lm' (model(tokens) -> logits over the next token), 'mse' or 'ce' on tensor data; 'auto' picks
    'lm' for text data and, for tensor data, 'ce' when the targets are integers, else 'mse'. `params` keeps
    only parameters matching a regex (Objective.select); `seq_len` None = min(64, the model's context).
    Nothing is unpickled. An HF config is sized before building (`allow_large` lifts the limit); weights
    that leave tensors missing or unexpected are refused unless `allow_missing`.
    """
    from . import losses
    from .data import TENSOR_SUFFIXES, load_domains

    p = Path(path)
    tokenizer = None
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{path} is a directory without config.json: not a Hugging Face model directory "
                            "(nor a run directory); save the model with save_pretrained")
        model, tokenizer = load_hf(p, trust_remote_code, allow_large=allow_large, allow_missing=allow_missing)
        kind, key = "hf", "input_ids"
    else:
        model = load_factory_model(p, factory, factory_config, trust_remote_code, allow_missing=allow_missing)
        kind, key = "factory", "tokens"
    paths = list((data or {}).values()) + list((ood or {}).values())
    tensors = [Path(x).suffix in TENSOR_SUFFIXES for x in paths]
    if any(tensors) and not all(tensors):
        raise UserError("mix of text and tensor data files; one model reads one kind of data")
    is_tensor = bool(tensors) and all(tensors)
    if kind == "hf" and is_tensor:
        raise UserError("a Hugging Face causal LM reads text; give text, .jsonl or directory domains")
    vocab = None if is_tensor else _vocab(model)
    if seq_len is None:  # default: 64 tokens, or the model's whole context where that is shorter
        seq_len = min(64, _context(model) or 64)
    domains, ood_names = load_domains(data, ood, tokenizer=tokenizer, vocab_size=vocab,
                                      context=None if is_tensor else _context(model), batch_size=batch_size,
                                      seq_len=seq_len, num_batches=num_batches, seed=seed, text_field=text_field,
                                      key=key)
    if kind == "hf":
        loss_fn = losses.CausalLMLoss()
    else:
        if loss == "auto":
            first = next(iter(domains.values()))[0]
            y = first.get("y", first.get("targets"))
            loss = "lm" if not is_tensor else ("ce" if y is not None and not y.is_floating_point() else "mse")
        table = {"lm": losses.TokenCrossEntropy, "mse": losses.TensorMSE, "ce": losses.ClassCrossEntropy}
        if loss not in table:
            raise UserError(f"unknown loss '{loss}'; choose auto, lm, mse or ce")
        if (loss == "lm") == is_tensor:
            raise UserError(f"loss '{loss}' does not fit {'tensor' if is_tensor else 'text'} data")
        loss_fn = table[loss]()
    from nexus_opt.train import resolve_device
    dev = resolve_device(device) if isinstance(device, str) else (device or torch.device("cpu"))
    model.to(dev)
    from nexus_opt.evaluate import move_batch
    domains = {d: [move_batch(b, dev) for b in bs] for d, bs in domains.items()}
    meta = {"path": str(path), "source": kind, "factory": factory, "loss": type(loss_fn).__name__,
            "data": dict(data), "ood": dict(ood or {}), "batch_size": batch_size, "seq_len": seq_len,
            "num_batches": num_batches, "seed": seed, "tokenizer": type(tokenizer).__name__ if tokenizer else "bytes"}
    obj = Objective(model, domains, loss_fn, ood=ood_names, meta=meta)
    return obj.select(params)
