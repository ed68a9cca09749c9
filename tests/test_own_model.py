"""Analyse your own model: HF directories, safetensors / state dicts + factory, file domains, --params, GGN."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from landscape import Objective, UserError
from landscape.data import load_domains, parse_specs, read_documents
from landscape.flatness import flatness
from landscape.ggn import GGNOperator, make_operator
from landscape.gradsim import gradient_similarity
from landscape.losses import CausalLMLoss, TokenCrossEntropy, output_loss
from landscape.sources import from_pretrained

from conftest import assert_one_line_error, invoke_cli

pytestmark = pytest.mark.usefixtures("one_thread")

GPT_CFG = {"vocab_size": 256, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 8}
DATA_KW = dict(batch_size=2, seq_len=8, num_batches=2, seed=0)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "code").mkdir()
    (d / "code" / "a.py").write_text("def add(x, y):\n    return x + y\n" * 20)
    (d / "code" / "sub").mkdir()
    (d / "code" / "sub" / "b.py").write_text("for i in range(10):\n    print(i * i)\n" * 20)
    (d / "code" / "blob.bin").write_bytes(bytes(range(256)) * 4)  # binary: skipped
    (d / "prose.jsonl").write_text("\n".join(json.dumps({"text": f"The {w} sat on the mat near the door. " * 3})
                                             for w in ("cat", "dog", "bird", "fox")) + "\n")
    (d / "math.txt").write_text("".join(f"{a} + {b} = {a + b}\n" for a in range(12) for b in range(5)))
    return {"code": str(d / "code"), "prose": str(d / "prose.jsonl"), "math": str(d / "math.txt")}


def _key_flatness(obj):
    r = flatness(obj, k=1, which="top", trace=False, max_hvps=12)
    return r.eigenvalues[0], r.loss


def _key_gradsim(obj):
    r = gradient_similarity(obj, resamples=0, per_layer=False)
    return np.array(r.cosine, dtype=float)


def _same(a, b):
    fa, fb = _key_flatness(a), _key_flatness(b)
    assert abs(fa[0] - fb[0]) <= 1e-10 * max(1.0, abs(fa[0])) and abs(fa[1] - fb[1]) <= 1e-10
    np.testing.assert_allclose(_key_gradsim(a), _key_gradsim(b), atol=1e-10, rtol=0)


# -- Hugging Face ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=256, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
                        eos_token_id=0, attn_implementation="eager")  # as from_pretrained loads it
    model = tf.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(d)
    return d, model


def test_hf_dir_matches_in_memory_model(hf_dir, texts):
    d, model = hf_dir
    doms, _ = load_domains({"code": texts["code"], "prose": texts["prose"]}, key="input_ids", vocab_size=256,
                           context=16, **DATA_KW)
    mem = Objective(model, doms, CausalLMLoss())
    disk = from_pretrained(d, data={"code": texts["code"], "prose": texts["prose"]}, **DATA_KW)
    assert disk.meta["source"] == "hf" and disk.num_params() == mem.num_params()
    # the loss is the model's own: HF's labels=input_ids loss (it shifts the labels itself)
    b = doms["code"][0]
    with torch.no_grad():
        ref = model(input_ids=b["input_ids"], labels=b["input_ids"]).loss
        assert abs(float(CausalLMLoss()(model, b)) - float(ref)) < 1e-6
    _same(mem, disk)


def test_hf_context_and_vocab_errors(hf_dir, texts, tmp_path):
    import shutil

    d, model = hf_dir
    with pytest.raises(UserError, match="longer than the model's context"):
        from_pretrained(d, data={"code": texts["code"]}, batch_size=2, seq_len=17, num_batches=1)
    with pytest.raises(UserError, match="without config.json"):
        from_pretrained(d.parent, data={"code": texts["code"]})
    shutil.copy(d / "config.json", tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle-format checkpoint: never read
    with pytest.raises(UserError, match="no .safetensors weights"):
        from_pretrained(tmp_path, data={"code": texts["code"]})
    doms = {"x": torch.tensor([1, 2, 300, 4, 5, 6, 7, 8, 9, 10, 11, 12])}
    from landscape.data import text_batches
    with pytest.raises(UserError, match="token id 300 .* vocabulary has 256"):
        text_batches(doms["x"], "x", batch_size=1, seq_len=4, num_batches=1, seed=0, vocab_size=256)

    class BigTok:
        def __len__(self):
            return 50257
    with pytest.raises(UserError, match="tokenizer has 50257 tokens but the model's embedding has 256"):
        load_domains({"code": texts["code"]}, tokenizer=BigTok(), vocab_size=256, **DATA_KW)


# -- state dicts + factory ---------------------------------------------------------------------------
def _gpt():
    from nexus_opt.models import GPT
    torch.manual_seed(1)
    return GPT(**GPT_CFG).eval()


def test_safetensors_and_state_dict_match_in_memory(tmp_path, texts):
    from safetensors.torch import save_model

    model = _gpt()
    save_model(model, str(tmp_path / "m.safetensors"))  # tied head/wte saved once
    torch.save(model.state_dict(), tmp_path / "m.pt")
    data = {"code": texts["code"], "math": texts["math"]}
    doms, _ = load_domains(data, vocab_size=256, context=16, **DATA_KW)
    mem = Objective(model, doms, TokenCrossEntropy())
    kw = dict(data=data, factory="nexus_opt.models:GPT", factory_config=GPT_CFG, trust_remote_code=True, **DATA_KW)
    for f in ("m.safetensors", "m.pt"):
        _same(mem, from_pretrained(tmp_path / f, **kw))


def test_state_dict_errors(tmp_path, texts):
    model = _gpt()
    kw = dict(data={"code": texts["code"]}, factory="nexus_opt.models:GPT", factory_config=GPT_CFG, **DATA_KW)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with pytest.raises(UserError, match="--trust-remote-code"):
        from_pretrained(tmp_path / "m.pt", **kw)
    kw["trust_remote_code"] = True
    torch.save({"model": model}, tmp_path / "pickle.pt")  # a pickled module: weights_only refuses it
    with pytest.raises(UserError, match="weights_only=True"):
        from_pretrained(tmp_path / "pickle.pt", **kw)
    sd = model.state_dict()
    sd.pop("blocks.0.ln1.bias")
    sd["extra.w"] = torch.zeros(2)
    torch.save(sd, tmp_path / "keys.pt")
    with pytest.raises(UserError, match=r"missing blocks\.0\.ln1\.bias; unexpected extra\.w"):
        from_pretrained(tmp_path / "keys.pt", **kw)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["blocks.0.mlp.0.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(UserError, match=r"'blocks\.0\.mlp\.0\.weight' has non-finite"):
        from_pretrained(tmp_path / "nan.pt", **kw)
    with pytest.raises(UserError, match="does not exist"):
        from_pretrained(tmp_path / "absent.pt", **kw)


# -- data files ---------------------------------------------------------------------------------------
def test_file_domains_are_seeded_and_reproducible(texts, tmp_path):
    data = {"code": texts["code"], "prose": texts["prose"]}
    a, _ = load_domains(data, ood={"math": texts["math"]}, **DATA_KW)
    b, ood = load_domains(data, ood={"math": texts["math"]}, **DATA_KW)
    c, _ = load_domains(data, ood={"math": texts["math"]}, **dict(DATA_KW, seed=1))
    assert ood == ["math"] and list(a) == ["code", "prose", "math"]
    for d in a:
        assert len(a[d]) == 2 and a[d][0]["tokens"].shape == (2, 9)
        assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a[d], b[d]))
        assert not all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a[d], c[d]))
    # the directory's two text files are both read (recursively), the binary file is not
    docs = read_documents(texts["code"], "code")
    assert len(docs) == 2 and all("\x00" not in d for d in docs)
    # byte tokens are the text's UTF-8 bytes
    w = a["math"][0]["tokens"][0]
    assert bytes(w.tolist()).decode() in open(texts["math"]).read()
    # tensor files: x/y, a seeded permutation of examples
    np.savez(tmp_path / "t.npz", x=np.arange(20.0).reshape(10, 2), y=np.arange(10.0))
    t1, _ = load_domains({"t": str(tmp_path / "t.npz")}, batch_size=3, num_batches=2, seed=0)
    t2, _ = load_domains({"t": str(tmp_path / "t.npz")}, batch_size=3, num_batches=2, seed=0)
    assert torch.equal(t1["t"][1]["x"], t2["t"][1]["x"]) and t1["t"][0]["x"].shape == (3, 2)
    assert torch.equal(t1["t"][0]["x"][:, 0] / 2, t1["t"][0]["y"])  # rows stay paired


def test_file_domain_errors(tmp_path, texts):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "short.txt").write_text("abc")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    np.savez(tmp_path / "k.npz", a=np.zeros(3))
    cases = [({"e": str(tmp_path / "empty.txt")}, "is empty"),
             ({"j": str(tmp_path / "bad.jsonl")}, "no string field 'text'.*--text-field"),
             ({"s": str(tmp_path / "short.txt")}, "too few for sequences"),
             ({"b": str(tmp_path / "bin.txt")}, "not UTF-8 text"),
             ({"k": str(tmp_path / "k.npz")}, "must hold tensors 'x' and 'y'"),
             ({"m": str(tmp_path / "missing")}, "does not exist")]
    for spec, msg in cases:
        with pytest.raises(UserError, match=msg):
            load_domains(spec, **DATA_KW)
    with pytest.raises(UserError, match="both in --data and --ood"):
        load_domains({"a": texts["math"]}, ood={"a": texts["math"]}, **DATA_KW)
    with pytest.raises(UserError, match="name=path"):
        parse_specs("code", "--data")


# -- parameter subsets ---------------------------------------------------------------------------------
def test_params_regex_restricts_every_analyzer(texts):
    from landscape.closeness import closeness
    from landscape.surface import surface

    model = _gpt()
    doms, _ = load_domains({"code": texts["code"], "math": texts["math"]}, **DATA_KW)
    obj = Objective(model, doms, TokenCrossEntropy()).select(r"blocks\.0\.attn\.")
    chosen = obj.params()
    assert set(chosen) == {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
                           "blocks.0.attn.proj.bias"}
    frozen = {n: p for n, p in model.named_parameters() if n not in chosen}
    before = {n: p.detach().clone() for n, p in frozen.items()}

    def never(grad):
        raise AssertionError("a gradient reached a parameter outside --params")
    hooks = [p.register_hook(never) for p in frozen.values()]
    n = obj.num_params()
    try:
        assert flatness(obj, k=1, which="top", trace=False, max_hvps=8).num_params == n
        assert flatness(obj, k=1, trace=False, max_hvps=8, curvature="ggn").num_params == n
        g = gradient_similarity(obj, resamples=0)
        assert set(g.per_layer) == set(chosen)
        c = closeness(obj, steps=3, curvature=False, barrier_points=3)
        assert c is not None
        s = surface(obj, grid=3, batch="loop")
        assert np.asarray(s.origin).size == n
    finally:
        for h in hooks:
            h.remove()
    for name, p in frozen.items():
        assert p.grad is None, name
        assert torch.equal(p.detach(), before[name]), name
    with pytest.raises(UserError, match="matches no parameter; names are like: wte.weight"):
        Objective(model, doms, TokenCrossEntropy()).select("nothing_here")


# -- Gauss-Newton ------------------------------------------------------------------------------------------
def _dense_ggn(obj, domain=None):
    """sum_b c_b J_b^T H_b J_b with J by autograd.functional.jacobian and H by autograd.functional.hessian of
    the loss in the outputs: independent of the operator's analytic output Hessian and jvp/vjp products."""
    from torch.autograd.functional import hessian, jacobian
    from torch.func import functional_call

    lo = output_loss(obj.loss_fn)
    w = obj.to(dtype=torch.float64)
    params = w.params()
    names = list(params)
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    shapes = [p.shape for p in params.values()]

    def named(t):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            m = int(np.prod(s)) if len(s) else 1
            out[k] = t[i:i + m].view(s)
            i += m
        return out

    class Bound(torch.nn.Module):
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, *a, **k):
            return functional_call(w.model, named(self.t), a, k, tie_weights=True, strict=False)

        def parameters(self, recurse=True):
            yield self.t

    G = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for c, b in w.terms(domain):
        out = lo.outputs(Bound(theta), b)
        J = jacobian(lambda t: lo.outputs(Bound(t), b), theta, vectorize=True).reshape(out.numel(), -1)
        H = hessian(lambda o: lo.from_outputs(o.view_as(out), b), out.detach().reshape(-1), vectorize=True)
        G += c * J.T @ H @ J
    return G


def test_ggn_matches_dense_for_cross_entropy_and_squared_error(texts, hf_dir):
    from nexus_opt.models import MLP
    from nexus_opt.suites.mix import mse_loss

    torch.manual_seed(0)
    mlp = MLP(in_dim=3, hidden=4, depth=1, out_dim=1)
    batches = [{"x": torch.randn(5, 3), "y": torch.randn(5)} for _ in range(2)]
    gpt = _gpt()
    tiny = {"vocab_size": 256, "block_size": 16, "n_layer": 1, "n_head": 1, "n_embd": 4}
    from nexus_opt.models import GPT
    torch.manual_seed(2)
    gpt = GPT(**tiny).eval()
    doms, _ = load_domains({"math": texts["math"]}, batch_size=2, seq_len=4, num_batches=2, seed=0)
    from nexus_opt.suites.text import lm_loss
    objs = [Objective(mlp, {"a": batches}, mse_loss), Objective(gpt, doms, lm_loss).select(r"^(blocks|ln_f)")]
    _, hf = hf_dir
    hdoms, _ = load_domains({"math": texts["math"]}, batch_size=1, seq_len=4, num_batches=2, seed=0, key="input_ids")
    objs.append(Objective(hf, hdoms, CausalLMLoss()).select(r"h\.0\.(attn|ln_1)"))
    for obj in objs:
        op = GGNOperator(obj)
        G = op.to_dense()
        D = _dense_ggn(obj)
        assert (G - D).abs().max().item() <= 1e-10 * max(1.0, D.abs().max().item()), type(obj.model).__name__
        assert torch.linalg.eigvalsh(D).min().item() > -1e-10  # PSD
    # MSE: the GGN is the Hessian minus the residual term; for a linear model it is the Hessian
    lin = torch.nn.Linear(3, 1)
    lobj = Objective(lin, {"a": batches}, mse_loss)
    H = make_operator(lobj, curvature="hessian").to_dense()
    assert (GGNOperator(lobj).to_dense() - H).abs().max().item() < 1e-12
    with pytest.raises(UserError, match="GGN needs a loss that exposes outputs"):
        GGNOperator(Objective(lin, {"a": batches}, lambda m, b: m(b["x"]).pow(2).mean()))


def test_flatness_ggn_default_finds_top_of_dense(texts):
    from nexus_opt.models import MLP
    from nexus_opt.suites.mix import mse_loss

    torch.manual_seed(3)
    obj = Objective(MLP(in_dim=3, hidden=4, depth=1, out_dim=1), {"a": [{"x": torch.randn(16, 3),
                                                                         "y": torch.randn(16)}]}, mse_loss)
    r = flatness(obj, k=2, trace=False, curvature="ggn")
    ev = torch.linalg.eigvalsh(_dense_ggn(obj)).flip(0)
    assert r.converged and r.bottom_eigenvalues is None and r.settings["curvature"] == "ggn"
    np.testing.assert_allclose(r.eigenvalues, ev[:2].numpy(), rtol=1e-4)  # the default tol (1e-4 relative): what the defaults promise


# -- CLI ------------------------------------------------------------------------------------------------
def test_cli_own_model_paths(hf_dir, texts, tmp_path):
    d, _ = hf_dir
    data = f"code={texts['code']},prose={texts['prose']}"
    common = ["--data", data, "--ood", f"math={texts['math']}", "--batch-size", "2", "--seq-len", "8",
              "--num-batches", "2"]
    r = invoke_cli("gradsim", str(d), *common, "--resamples", "0", "--json", str(tmp_path / "g.json"))
    assert r.exit_code == 0, r.output
    g = json.loads((tmp_path / "g.json").read_text())["results"][0]["result"]
    assert g["domains"] == ["code", "prose", "math"] and g["ood"] == ["math"]
    r = invoke_cli("flatness", str(d), *common, "-k", "1", "--which", "top", "--no-trace", "--max-hvps", "6",
                   "--params", r"h\.0\.mlp", "--json", str(tmp_path / "f.json"))
    assert r.exit_code == 0, r.output
    f = json.loads((tmp_path / "f.json").read_text())["results"][0]["result"]["results"]["train"]
    assert f["num_params"] == sum(p.numel() for n, p in hf_dir[1].named_parameters() if "h.0.mlp" in n)
    for args, msg in [(["gradsim", str(d)], "without data"),
                      (["gradsim", str(d), "--data", data, "--params", "zzz"], "matches no parameter"),
                      (["flatness", str(d), "--data", data, "--seq-len", "99"], "longer than the model's context"),
                      (["flatness", str(tmp_path / "w.pt"), "--data", data], "does not exist"),
                      (["flatness", str(d), "--data", data, "--curvature", "fisher"], "unknown curvature 'fisher'"),
                      (["flatness", str(d), "--data", data, "--curvature", "ggn", "--backend", "pyhessian"],
                       "pyhessian backend computes Hessian products only")]:
        r = invoke_cli(*args)
        assert_one_line_error(r.exit_code, r.stderr, contains=msg)


def _word_tokenizer(texts, size):
    """A small BPE tokenizer trained offline on the test texts (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(read_documents(texts["code"], "code") + [open(texts["math"]).read()],
                            trainers.BpeTrainer(vocab_size=size, special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def test_hf_dir_with_its_own_tokenizer(hf_dir, texts, tmp_path):
    import shutil

    d, _ = hf_dir
    shutil.copytree(d, tmp_path / "m")
    tok = _word_tokenizer(texts, 120)
    tok.save_pretrained(tmp_path / "m")
    obj = from_pretrained(tmp_path / "m", data={"math": texts["math"]}, **DATA_KW)
    assert obj.meta["tokenizer"] != "bytes"
    stream = tok(open(texts["math"]).read(), add_special_tokens=False)["input_ids"]
    w = obj.domains["math"][0]["input_ids"][0].tolist()
    assert any(stream[i:i + len(w)] == w for i in range(len(stream) - len(w) + 1))  # a window of its ids
    big = _word_tokenizer(texts, 120)
    big.add_tokens([f"extra{i}" for i in range(300)])  # now larger than the model's 256 embeddings
    shutil.rmtree(tmp_path / "m")
    shutil.copytree(d, tmp_path / "m")
    big.save_pretrained(tmp_path / "m")
    with pytest.raises(UserError, match="the tokenizer does not belong to this model"):
        from_pretrained(tmp_path / "m", data={"math": texts["math"]}, **DATA_KW)
