"""Issue 18, cases 3-7: foreign models checked like our own, bounded reads, our own files validated on the way
back in, the API's bounds and short error lines. One named test per case."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import landscape
from landscape import Objective
from nexus_opt import checkpoint as ck
from nexus_opt.errors import UserError

from conftest import assert_one_line_error, copy_run, invoke_cli

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "def add(x, y):\n    return x + y\n" * 40
HF_KW = ["--batch-size", "2", "--seq-len", "8", "--num-batches", "1", "--resamples", "0", "--device", "cpu"]


def _fast_error(*args, contains=None, max_s=20.0) -> str:
    t0 = time.time()
    r = invoke_cli(*args)
    assert time.time() - t0 < max_s, f"took {time.time() - t0:.1f} s"
    return assert_one_line_error(r.exit_code, r.stderr, contains=contains)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "code.txt"
    p.write_text(TEXT)
    return p


# -- 3. other people's models ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=256, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
                        eos_token_id=0, tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("hf") / "gpt2"
    tf.GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


def _hf_variant(hf_dir, tmp_path, drop=None, config=None, weights_bytes=None) -> Path:
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    if drop is not None:
        t = load_file(str(d / "model.safetensors"))
        save_file({k: v for k, v in t.items() if not drop(k)}, str(d / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        c = json.loads((d / "config.json").read_text())
        c.update(config)
        (d / "config.json").write_text(json.dumps(c))
    if weights_bytes is not None:
        (d / "model.safetensors").write_bytes(weights_bytes(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("drop,name", [(lambda k: k == "lm_head.weight", "lm_head.weight"),
                                       (lambda k: "ln_f" in k, "transformer.ln_f"),
                                       (lambda k: ".h.0." in k, "transformer.h.0")])
def test_hf_weights_missing_tensors_are_refused_naming_them(hf_dir, tmp_path, text_file, drop, name):
    d = _hf_variant(hf_dir, tmp_path, drop=drop)
    _fast_error("gradsim", d, "--data", f"code={text_file}", *HF_KW, contains=name)


def test_hf_missing_tensors_with_allow_missing_are_analysed(hf_dir, tmp_path, text_file):
    d = _hf_variant(hf_dir, tmp_path, drop=lambda k: "ln_f" in k)
    r = invoke_cli("gradsim", d, "--data", f"code={text_file}", *HF_KW, "--allow-missing")
    assert r.exit_code == 0, r.output


def test_hf_config_with_more_layers_than_saved_is_refused(hf_dir, tmp_path, text_file):
    d = _hf_variant(hf_dir, tmp_path, config={"n_layer": 2})
    _fast_error("gradsim", d, "--data", f"code={text_file}", *HF_KW, contains="transformer.h.1")


@pytest.mark.parametrize("field,value,says", [("n_layer", 0, "n_layer must be between 1"),
                                              ("n_embd", 0, "n_embd must be between 1"),
                                              ("n_head", 0, "n_head must be between 1"),
                                              ("n_layer", "1", "n_layer must be an integer"),
                                              ("n_embd", 7, "not a multiple of the number of heads")])
def test_hf_config_fields_are_validated(hf_dir, tmp_path, text_file, field, value, says):
    d = _hf_variant(hf_dir, tmp_path, config={field: value})
    _fast_error("gradsim", d, "--data", f"code={text_file}", *HF_KW, contains=says)


def test_hf_config_is_sized_before_building(hf_dir, tmp_path, text_file):
    d = _hf_variant(hf_dir, tmp_path, config={"n_layer": 10 ** 9})
    _fast_error("gradsim", d, "--data", f"code={text_file}", *HF_KW, contains="n_layer", max_s=10)
    d = _hf_variant(hf_dir, tmp_path / "a", config={"n_layer": 10 ** 5})
    _fast_error("gradsim", d, "--data", f"code={text_file}", *HF_KW, contains="--allow-large", max_s=10)
    d2 = _hf_variant(hf_dir, tmp_path / "b", config={"n_embd": 1 << 20, "n_head": 1})
    _fast_error("gradsim", d2, "--data", f"code={text_file}", *HF_KW, contains="needs about", max_s=10)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_hf_unreadable_weights_are_one_line(hf_dir, tmp_path, text_file, how):
    mangle = (lambda p: b"garbage" * 30) if how == "garbage" else (lambda p: p.read_bytes()[:200])
    d = _hf_variant(hf_dir, tmp_path, weights_bytes=mangle)
    _fast_error("gradsim", d, "--data", f"code={text_file}", *HF_KW, contains="cannot load a causal LM")


@pytest.fixture
def linear_files(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    save_file(dict(lin.state_dict()), str(tmp_path / "m.safetensors"))
    save_file({"x": torch.randn(8, 3), "y": torch.randn(8, 1)}, str(tmp_path / "d.safetensors"))
    return tmp_path / "m.safetensors", tmp_path / "d.safetensors"


LIN = ["--factory", "torch.nn:Linear", "--trust-remote-code", "--batch-size", "2", "--num-batches", "2",
       "--resamples", "0", "--device", "cpu"]


@pytest.mark.parametrize("cfg", ['{"bogus": 1}', '{"in_features": -1, "out_features": 1}'])
def test_factory_config_errors_are_user_errors(linear_files, cfg):
    m, d = linear_files
    _fast_error("gradsim", m, "--data", f"a={d}", *LIN, "--factory-config", cfg, contains="refused its config")


# -- 4. bounded reads -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dev", ["/dev/zero", "/dev/urandom"])
def test_data_from_a_device_is_refused(linear_files, dev):
    m, _ = linear_files
    _fast_error("gradsim", m, "--data", f"a={dev}", *LIN, "--factory-config",
                '{"in_features": 3, "out_features": 1}', contains="a device", max_s=10)


@pytest.mark.parametrize("link", [False, True])
def test_data_from_a_fifo_is_refused(linear_files, tmp_path, link):
    m, _ = linear_files
    fifo = tmp_path / "p.txt"
    os.mkfifo(fifo)
    target = fifo
    if link:
        target = tmp_path / "l.txt"
        target.symlink_to(fifo)
    res = {}
    t = threading.Thread(target=lambda: res.update(r=invoke_cli(
        "gradsim", m, "--data", f"a={target}", *LIN, "--factory-config", '{"in_features": 3, "out_features": 1}')))
    t.start()
    t.join(20)
    if t.is_alive():
        with open(fifo, "wb"):
            pass
        pytest.fail("--data FIFO blocked")
    assert_one_line_error(res["r"].exit_code, res["r"].stderr, contains="FIFO")


def test_data_over_the_size_cap_is_refused_with_its_size(text_file, monkeypatch):
    from landscape.data import read_documents

    monkeypatch.setenv("LANDSCAPE_MAX_INPUT", "1K")
    with pytest.raises(UserError, match=r"is 1\.2 KB, more than the 1\.0 KB limit"):
        read_documents(text_file, "code")


@pytest.mark.parametrize("regex,says", [("(((.*)*)*)*Z", "nests a repetition"), ("a{99999999999}", "not a valid"),
                                        ("a{5000}", "at most 1000"), ("x" * 5000, "characters long")])
def test_params_regex_is_bounded(bowls_run, regex, says):
    _fast_error("gradsim", bowls_run, "--device", "cpu", "--resamples", "0", "--params", regex, contains=says,
                max_s=10)


# -- 5. our own files, edited ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def surface_npz(bowls_run, tmp_path_factory):
    obj = landscape.load(bowls_run, device="cpu")
    out = tmp_path_factory.mktemp("surf") / "s.npz"
    landscape.surface(obj, grid=3, out=out)
    return out


def _edit_npz(src: Path, dst: Path, meta=None, arrays=None) -> Path:
    with np.load(src, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    m = json.loads(str(a["meta"]))
    if meta:
        m.update(meta)
    a.update(arrays or {})
    a["meta"] = np.array(json.dumps(m))
    with open(dst, "wb") as f:
        np.savez(f, **a)
    return dst


@pytest.mark.parametrize("case,meta,arrays", [
    ("version-abc", {"format_version": "abc"}, None), ("version-null", {"format_version": None}, None),
    ("string-x", None, {"x": np.array(["a", "b", "c"])}), ("nan-y", None, {"y": np.array([0.0, np.nan, 1.0])}),
    ("domains-7", {"domains": 7}, None), ("settings-list", {"settings": [1, 2]}, None),
    ("points-strings", {"points": {"theta": ["a", "b"]}}, None),
    ("loss-shape", None, {"loss_0": np.zeros((2, 2))})])
def test_edited_surface_file_is_refused(surface_npz, tmp_path, case, meta, arrays):
    f = _edit_npz(surface_npz, tmp_path / "e.npz", meta, arrays)
    with pytest.raises(UserError):
        landscape.SurfaceResult.load(f)
    _fast_error("plot-surface", "--from", f, "--out", tmp_path / "o")


def test_surface_file_with_a_million_names_gives_a_short_line(surface_npz, tmp_path):
    f = _edit_npz(surface_npz, tmp_path / "e.npz", {"loss_names": [f"d{i}" for i in range(10 ** 6)]})
    line = _fast_error("plot-surface", "--from", f, "--out", tmp_path / "o")
    assert len(line) < 1100


def test_forged_partial_grid_rows_are_refused(bowls_run, tmp_path):
    obj = landscape.load(bowls_run, device="cpu")
    out = tmp_path / "g.npz"

    def stop(done, total, what):
        if done:
            raise KeyboardInterrupt  # killed after the first block of rows
    with pytest.raises(KeyboardInterrupt):
        landscape.surface(obj, grid=4, batch="loop", out=out, progress=stop)
    part = next(tmp_path.glob("g.npz.part*.jsonl"))
    good = part.read_text()
    for forged in ({"rows": [99], "names": ["a"], "losses": {"a": [[1.0]]}},
                   {"rows": ["x"], "names": [], "losses": {}}, [1, 2], {"rows": [1]}):
        part.write_text(good + json.dumps(forged) + "\n")
        with pytest.raises(UserError, match="not a valid partial-grid record"):
            landscape.surface(obj, grid=4, batch="loop", out=out)
    part.write_text(good)  # the genuine rows still resume
    r = landscape.surface(obj, grid=4, batch="loop", out=out)
    assert r.timing["resumed_rows"] >= 1


def _reseal(ckpt: Path, name: str, edit) -> None:
    t = load_file(str(ckpt / name))
    edit(t)
    save_file(t, str(ckpt / name))
    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"][name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    m["manifest_sha256"] = ck._manifest_digest(m)
    (ckpt / "manifest.json").write_text(json.dumps(m))


def _first_matrix_state(t: dict) -> str:
    return next(k for k, v in t.items() if k.endswith("exp_avg") and v.dim() == 2)


@pytest.mark.parametrize("case", ["transposed", "nine-columns", "step-minus-5", "complex"])
def test_resealed_optimizer_state_is_refused_before_resume(tiny_mix_run, tmp_path, case):
    run = copy_run(tiny_mix_run, tmp_path / "R")
    last = run / "ckpt-000006"

    def edit(t):
        k = _first_matrix_state(t)
        if case == "transposed":
            t[k] = t[k].t().contiguous()
        elif case == "nine-columns":
            t[k] = torch.zeros(t[k].shape[0], 9)
        elif case == "step-minus-5":
            s = next(n for n in t if n.endswith(".step"))
            t[s] = torch.tensor(-5.0)
        else:
            t[k] = t[k].to(torch.complex64)
    _reseal(last, "state.safetensors", edit)
    before = {p.name: p.read_bytes() for p in last.iterdir()}
    r = invoke_cli("train", "--resume", "--out", run, "--device", "cpu", "--steps", "8")
    assert_one_line_error(r.exit_code, r.stderr, contains="complex64" if case == "complex" else "cannot resume")
    assert {p.name: p.read_bytes() for p in last.iterdir()} == before and not (run / "ckpt-000008").exists()


def test_float8_tensors_are_refused_by_name(bowls_run, tmp_path, linear_files):
    run = copy_run(bowls_run, tmp_path / "R")
    _reseal(run / "ckpt-000002", "model.safetensors",
            lambda t: t.update({k: v.to(torch.float8_e4m3fn) for k, v in t.items()}))
    with pytest.raises(UserError, match="float8_e4m3fn"):
        landscape.load(run, device="cpu")
    m, _ = linear_files
    save_file({"x": torch.randn(8, 3).to(torch.float8_e4m3fn), "y": torch.randn(8, 1)}, str(tmp_path / "f8.safetensors"))
    _fast_error("gradsim", m, "--data", f"a={tmp_path / 'f8.safetensors'}", *LIN, "--factory-config",
                '{"in_features": 3, "out_features": 1}', contains="float8_e4m3fn")
    save_file({"weight": torch.randn(1, 3).to(torch.float8_e4m3fn), "bias": torch.zeros(1)}, str(tmp_path / "w8.safetensors"))
    _fast_error("gradsim", tmp_path / "w8.safetensors", "--data", f"a={linear_files[1]}", *LIN, "--factory-config",
                '{"in_features": 3, "out_features": 1}', contains="float8_e4m3fn")


def test_jsonl_with_a_lone_surrogate_is_a_user_error(tmp_path):
    from landscape.data import read_documents

    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "abc \\ud800 def"}\n')
    with pytest.raises(UserError, match="unpaired surrogate"):
        read_documents(p, "s")


# -- 6. the Python API's bounds ------------------------------------------------------------------------------
def _mse(m, b):
    return ((m(b["x"]) - b["y"]) ** 2).mean()


def test_batch_with_mismatched_leading_dims_is_refused():
    with pytest.raises(UserError, match="disagree on the number of examples"):
        Objective(torch.nn.Linear(3, 1), {"a": [{"x": torch.randn(8, 3), "y": torch.randn(1, 1)}]}, _mse)


def test_ce_refuses_non_integer_float_targets():
    from landscape.losses import ClassCrossEntropy

    obj = Objective(torch.nn.Linear(3, 4), {"a": [{"x": torch.randn(6, 3), "y": torch.rand(6) * 3}]},
                    ClassCrossEntropy())
    with pytest.raises(UserError, match="integer class labels"):
        landscape.gradient_similarity(obj, resamples=0)
    ok = Objective(torch.nn.Linear(3, 4), {"a": [{"x": torch.randn(6, 3), "y": torch.tensor([0., 1, 2, 3, 0, 1])}]},
                   ClassCrossEntropy())
    landscape.gradient_similarity(ok, resamples=0)  # integer-valued floats are labels


class _Noisy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x) + torch.randn(x.shape[0], 1)  # random in eval mode too


def test_non_deterministic_eval_forward_is_reported():
    obj = Objective(_Noisy(), {"a": [{"x": torch.randn(8, 3), "y": torch.randn(8, 1)}]}, _mse)
    with pytest.raises(UserError, match="two evaluations of the same batch disagree"):
        landscape.flatness(obj, k=1, trace=False)
    with pytest.raises(UserError, match="not deterministic"):
        landscape.gradient_similarity(obj, resamples=0)


def test_surface_grid_is_bounded_in_the_library(bowls_run):
    obj = landscape.load(bowls_run, device="cpu")
    t0 = time.time()
    for g in (10 ** 6, (3, 10 ** 6), 1, "x"):
        with pytest.raises(UserError, match="grid"):
            landscape.surface(obj, grid=g)
    assert time.time() - t0 < 5


def test_complex_loss_is_refused():
    obj = Objective(torch.nn.Linear(3, 1), {"a": [{"x": torch.randn(8, 3), "y": torch.randn(8, 1)}]},
                    lambda m, b: _mse(m, b).to(torch.complex64))
    with pytest.raises(UserError, match="complex64"):
        obj.validate()


# -- 7. short error lines -------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["gradsim", "R", "--domains", ",", "--params", "x" * 100_000],
                                  ["train", "--suite-options", "x" * 100_000],
                                  ["gradsim", "y" * 100_000],
                                  ["plot-surface", "R", "--span", "z" * 100_000]])
def test_error_lines_are_short(bowls_run, args):
    args = [str(bowls_run) if a == "R" else a for a in args]
    line = _fast_error(*args)
    assert len(line) <= 1000 + len("error: ")


def test_a_forged_manifest_name_that_is_a_list_is_a_user_error():
    """trainer.config.optimizer: [...] in a resealed manifest ended in 'unhashable type' (hostile_full found it)."""
    from nexus_opt.errors import UserError
    from nexus_opt.util import choose

    for bad in ([1, 2], {"a": 1}):
        with pytest.raises(UserError, match="optimizer must be a name"):
            choose(bad, ("adamw", "nexus"), "optimizer", aliases={"adam": "adamw"})
    assert choose("adam", ("adamw",), "optimizer", aliases={"adam": "adamw"}) == "adamw"
