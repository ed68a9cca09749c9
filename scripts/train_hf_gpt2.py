"""Train a tiny byte-level GPT-2 (Hugging Face transformers, built offline from a config: nothing is downloaded)
on code / prose / math text, save it with save_pretrained, and write held-out text files per domain.

It stands for "a model no one here trained": the landscape CLI then analyses the saved directory through the
own-model path (landscape gradsim ./hf-gpt2/model --data code=...,prose=...,math=... --ood wordmath=...).

Usage: python scripts/train_hf_gpt2.py [--out hf-gpt2] [--steps 300] [--seed 0]
Needs the hf extra (transformers): scripts/setup.sh --hf, or pip install -e '.[hf]' in this checkout.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="hf-gpt2", help="output directory (model/ and data/ inside)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging
    except ImportError:
        print("error: this script needs the hf extra (transformers); install it from this checkout with "
              "scripts/setup.sh --hf (or pip install -e '.[hf]')", file=sys.stderr)
        sys.exit(2)

    from nexus_opt.suites.text import Text

    logging.disable_progress_bar()
    torch.manual_seed(a.seed)
    out = Path(a.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    suite = Text(seed=a.seed, block_size=a.seq_len)
    trained = ["code", "prose", "math"]
    # held-out text per domain (the suite's evaluation split: every 10th document), for the analysis
    for d in trained + ["wordmath"]:
        (out / "data" / f"{d}.txt").write_bytes(bytes(suite.corpus(d, "eval").to(torch.uint8).tolist()))
    corpora = {d: suite.corpus(d, "train") for d in trained}

    cfg = GPT2Config(vocab_size=256, n_positions=a.seq_len, n_embd=32, n_layer=2, n_head=2, bos_token_id=10,
                     eos_token_id=10, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    # GPT2LMHeadModel's class name names no loss, so transformers falls back to the causal-LM loss with a warning;
    # that loss is the one meant here: name it
    model.loss_type = "ForCausalLM"
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(a.seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(a.steps):
        d = trained[step % len(trained)]  # source-pure batches, round robin over the domains
        data = corpora[d]
        starts = torch.randint(0, len(data) - a.seq_len, (a.batch_size,), generator=gen)
        ids = torch.stack([data[s:s + a.seq_len] for s in starts.tolist()])
        lr = a.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / a.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step:4d}  {d:6s} loss {loss.item():.3f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
    model.eval().save_pretrained(out / "model")  # safetensors
    print(f"saved {out / 'model'} ({sum(p.numel() for p in model.parameters())} parameters) and "
          f"{out / 'data'}/{{code,prose,math,wordmath}}.txt")


if __name__ == "__main__":
    main()
