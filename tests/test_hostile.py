"""The hostile-input suite, generated rather than hand-listed (issue 14).

* Every manifest field (leaves and containers) of a tiny checkpoint is mutated to wrong types, huge and
  negative values, NaN and deep nesting, or deleted, with the manifest digest recomputed so the mutation
  reaches the parser; `landscape.load` and `landscape train --resume` must then end in one `error:` line
  (exit 2) or a documented success, within seconds, leaving the run's earlier checkpoint untouched.
* Every numeric option of every command (demo has none) is given 0, -1, nan, inf, 1e308 and a string.
* Two concurrent writers on one run directory (in test_hostile_regressions.py).
* Every output option of every command that reads a checkpoint (--json/--csv/--plot) is pointed at every file of the
  run directory it reads, directly and through a symlink, and at every input file of a model trained elsewhere (its
  weights, --data, --ood): each must be refused in one line with nothing touched (the output rule, issue 18).
* Every entry of a run (checkpoint directories, their files, latest.json, metrics.jsonl, the lock) is replaced by
  a symlink leading out of the run: every reader and `train --resume` must refuse it, never writing the outside copy.

CI runs a deterministic sample (one mutation per field, one value per option); the full cross product
runs under `-m hostile_full`. `hostile_case_counts()` (and `python tests/test_hostile.py`) gives the counts.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import typing
from pathlib import Path

import pytest

from conftest import TINY_MIX, assert_one_line_error, invoke_cli, tiny_config

FINAL, EARLIER = "ckpt-000006", "ckpt-000002"
SECONDS = 20.0  # "within a few seconds" on two shared cores, with margin

# -- manifest mutations ----------------------------------------------------------------------------
_DELETE = object()


def _deep(n: int):
    v: object = 0
    for _ in range(n):
        v = [v]
    return v


MUTATIONS = {
    "str": "abc", "list": [1, 2, 3], "dict": {"x": 1}, "null": None, "bool": True, "zero": 0, "neg": -1,
    "huge-int": 10 ** 18, "huge-float": 1e308, "nan": float("nan"), "inf": float("inf"), "deep": _deep(200),
    "delete": _DELETE,
}
SKIP_PATHS = {("manifest_sha256",)}  # the digest itself is recomputed after every mutation


def _paths(obj, prefix=()):
    """Every path of a JSON value: containers first, then their children (leaves included)."""
    if prefix:
        yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(m, path, value):
    o = m
    for k in path[:-1]:
        o = o[k]
    if value is _DELETE:
        if isinstance(o, dict):
            del o[path[-1]]
        else:
            o.pop(path[-1])
    else:
        o[path[-1]] = value


def _digest(m: dict) -> str:
    from nexus_opt import checkpoint as ck

    return ck._manifest_digest(m)


def _sha(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny mix run reduced to an earlier and a final checkpoint (mutations hit the final one)."""
    from nexus_opt.train import train

    out = tmp_path_factory.mktemp("hostile") / "run"
    train(tiny_config(TINY_MIX, out))
    for c in out.glob("ckpt-*"):
        if c.name not in (FINAL, EARLIER):
            shutil.rmtree(c)
    return out


# The field paths are taken from a real manifest at collection time (one tiny run, ~1 s).
def _collect_paths() -> list[tuple]:
    import tempfile

    from nexus_opt.train import train

    with tempfile.TemporaryDirectory() as d:
        train(tiny_config(dict(TINY_MIX, steps=2, ckpt_every=2), Path(d) / "run"))
        m = json.loads((Path(d) / "run" / "ckpt-000002" / "manifest.json").read_text())
    return [p for p in _paths(m) if p not in SKIP_PATHS]


_PATHS = _collect_paths()
MANIFEST_CASES = [(path, name) for path in _PATHS for name in MUTATIONS]


def _sample(cases: list, key) -> list:
    """One case per field: the mutation picked by a stable hash of the field path (deterministic)."""
    by: dict = {}
    for c in cases:
        by.setdefault(key(c), []).append(c)
    out = []
    for k, group in by.items():
        h = int(hashlib.sha256(repr(k).encode()).hexdigest(), 16)
        out.append(group[h % len(group)])
    return out


def _representative(path: tuple) -> bool:
    """Fields sampled in CI: all but the 2nd, 3rd, ... copies of per-parameter optimizer entries and domain lists."""
    repeated = ("__items__", "param_groups", "params", "train", "ood", "base_lrs")
    return not any(isinstance(k, int) and k > 0 and i > 0 and path[i - 1] in repeated for i, k in enumerate(path))


# CI: one case per object of the manifest (field and mutation picked by a stable hash), the full set on demand.
MANIFEST_SAMPLE = _sample([c for c in MANIFEST_CASES if _representative(c[0])], key=lambda c: c[0][:-1])


@pytest.fixture
def full_set(request):
    """The full cross product runs only when asked for: `pytest -m hostile_full`."""
    if "hostile_full" not in (request.config.getoption("-m") or ""):
        pytest.skip("full hostile-input set: run with -m hostile_full")


def _id(path, name) -> str:
    return ".".join(map(str, path)) + ":" + name


def _mutate_and_check(base_run: Path, tmp_path: Path, path: tuple, name: str) -> None:
    import landscape
    from nexus_opt.errors import UserError

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = _sha(run / EARLIER)
    mpath = run / FINAL / "manifest.json"
    m = json.loads(mpath.read_text())
    _set(m, path, MUTATIONS[name])
    m["manifest_sha256"] = _digest(m)
    mpath.write_text(json.dumps(m))
    t0 = time.time()
    try:
        landscape.load(run, device="cpu")
    except UserError as e:
        assert str(e) and "\n" not in str(e)
    r = invoke_cli("train", "--resume", "--out", run, "--device", "cpu")
    if r.exit_code != 0:
        assert_one_line_error(r.exit_code, r.stderr)
    assert time.time() - t0 < SECONDS
    assert _sha(run / EARLIER) == before  # earlier checkpoints are never touched


@pytest.mark.parametrize("path,name", MANIFEST_SAMPLE, ids=[_id(*c) for c in MANIFEST_SAMPLE])
def test_manifest_mutation_sample(base_run, tmp_path, path, name):
    _mutate_and_check(base_run, tmp_path, path, name)


@pytest.mark.hostile_full
@pytest.mark.parametrize("path,name", MANIFEST_CASES, ids=[_id(*c) for c in MANIFEST_CASES])
def test_manifest_mutation_full(full_set, base_run, tmp_path, path, name):
    _mutate_and_check(base_run, tmp_path, path, name)


# -- numeric CLI options ---------------------------------------------------------------------------
VALUES = ["0", "-1", "nan", "inf", "1e308", "abc"]


def _numeric_options() -> list[tuple[str, str]]:
    """(command, --option) for every INT/FLOAT option of every command, read from the CLI itself."""
    import typer.main

    from cli.main import app

    group = typer.main.get_command(app)
    res = []
    for name, cmd in sorted(group.commands.items()):
        for p in cmd.params:
            desc = getattr(p, "type_descriptor", None)
            ann = desc.annotation if desc is not None else getattr(getattr(p, "type", None), "name", None)
            kinds = set(typing.get_args(ann)) | {ann}
            if kinds & {int, float, "integer", "float"} and getattr(p, "opts", None) and p.opts[0].startswith("-"):
                res.append((name, max(p.opts, key=len)))
    return res


OPTIONS = _numeric_options()
OPTION_CASES = [(c, o, v) for c, o in OPTIONS for v in VALUES]
OPTION_SAMPLE = _sample(OPTION_CASES, key=lambda c: (c[0], c[1]))


def _base_args(command: str, run: Path, tmp: Path) -> list[str]:
    return {
        "train": ["--suite", "bowls", "--max-steps", "2", "--accum", "1", "--warmup", "1", "--eval-every", "1",
                  "--ckpt-every", "2", "--device", "cpu", "--out", str(tmp / "out")],
        "flatness": [str(run), "--device", "cpu", "--trace-probes", "4"],
        "gradsim": [str(run), "--device", "cpu", "--resamples", "4"],
        "closeness": [str(run), "--device", "cpu", "--max-steps", "20"],
        "plot-surface": [str(run), "--device", "cpu", "--grid", "5", "--descent-steps", "20", "--out", str(tmp / "surf")],
        "mechanism": ["--gammas", "0.2", "--orders", "1", "--starts", "2", "--steps", "4", "--out", str(tmp / "mech")],
        "sharpness": [str(run), "--device", "cpu", "--samples", "4", "--steps", "3"],
        "connect": [str(run / "ckpt-000000"), str(run), "--device", "cpu", "--points", "5"],
        "alignment": [str(run), "--device", "cpu", "--gammas", "0.1", "--K", "2"],
        "study": ["--quick", "--out", str(tmp / "study")],  # every hostile value is refused before any training
    }[command]


def _with(args: list[str], option: str, value: str) -> list[str]:
    args = list(args)
    if option in args:
        i = args.index(option)
        del args[i:i + 2]
    return args + [option, value]


# The only hostile option values that succeed: each is a meaningful setting.
DOCUMENTED_SUCCESS = {(c, o, v) for c in ("train", "flatness", "gradsim", "closeness", "plot-surface", "mechanism",
                                           "sharpness", "connect", "alignment")
                      for o in ("--seed", "--data-seed") for v in ("0", "-1")} | {
    ("gradsim", "--resamples", "0"),        # no bootstrap: cosines without error bars
    ("closeness", "--rtol", "0"),           # stop on the absolute gradient norm (--atol) alone
    ("closeness", "--atol", "0"),           # stop on the relative gradient norm (--rtol) alone
    ("closeness", "--prox-mu", "0"),        # the plain loss, no proximal term
    ("train", "--weight-decay", "0"),       # plain Adam
    ("train", "--warmup", "0"),             # no warmup
    ("train", "--min-lr-ratio", "0"),       # cosine down to 0
    ("plot-surface", "--descent-steps", "0"),  # domain minima taken at theta (no descent)
    ("train", "--gradsim-every", "0"),      # no gradient-similarity tracking (the default)
}


def _option_check(bowls_run: Path, tmp_path: Path, command: str, option: str, value: str) -> None:
    t0 = time.time()
    r = invoke_cli(command, *_with(_base_args(command, bowls_run, tmp_path), option, value))
    took = time.time() - t0
    if r.exit_code != 0:
        assert_one_line_error(r.exit_code, r.stderr)
    else:  # a documented success: the value is meaningful
        assert (command, option, value) in DOCUMENTED_SUCCESS, (command, option, value, r.stdout[-300:])
    assert took < SECONDS, f"{command} {option} {value} took {took:.1f}s"


@pytest.mark.parametrize("command,option,value", OPTION_SAMPLE, ids=[f"{c}{o}={v}" for c, o, v in OPTION_SAMPLE])
def test_numeric_option_sample(bowls_run, tmp_path, command, option, value):
    _option_check(bowls_run, tmp_path, command, option, value)


@pytest.mark.hostile_full
@pytest.mark.parametrize("command,option,value", OPTION_CASES, ids=[f"{c}{o}={v}" for c, o, v in OPTION_CASES])
def test_numeric_option_full(full_set, bowls_run, tmp_path, command, option, value):
    _option_check(bowls_run, tmp_path, command, option, value)


def hostile_case_counts() -> dict:
    """How many hostile cases the suite holds (full) and runs by default (sample)."""
    return {"manifest_fields": len(_PATHS), "manifest_mutations": len(MUTATIONS),
            "manifest_cases_full": len(MANIFEST_CASES), "manifest_cases_sample": len(MANIFEST_SAMPLE),
            "numeric_options": len(OPTIONS), "option_values": len(VALUES),
            "option_cases_full": len(OPTION_CASES), "option_cases_sample": len(OPTION_SAMPLE),
            "output_cases_full": len(OUTPUT_CASES) + len(INPUT_CASES),
            "output_cases_sample": len(OUTPUT_SAMPLE) + len(INPUT_SAMPLE),
            "symlink_cases_full": len(LINK_CASES), "symlink_cases_sample": len(LINK_SAMPLE)}


def test_the_suite_counts_its_cases():
    c = hostile_case_counts()
    print("hostile-input cases:", json.dumps(c))
    assert c["manifest_fields"] >= 100 and c["numeric_options"] >= 20
    assert c["manifest_cases_full"] == c["manifest_fields"] * len(MUTATIONS)
    assert 20 <= c["manifest_cases_sample"] <= c["manifest_fields"]
    assert {o for _, o, _ in OPTION_SAMPLE} == {o for _, o in OPTIONS}
    assert {c for c, _ in WRITERS} == {"alignment", "closeness", "connect", "flatness", "gradsim", "plot-surface", "sharpness"}
    assert c["output_cases_full"] >= 100 and {(c, o) for c, o, _, _ in OUTPUT_SAMPLE} == set(WRITERS)
    assert {e for _, e in LINK_SAMPLE} == set(LINK_ENTRIES) | {".lock"}


if __name__ == "__main__":
    print(json.dumps(hostile_case_counts(), indent=2))


# -- output paths (issue 18): every writing command x every file of a run directory and every input file ---------
RUN_FILES = ["latest.json", "metrics.jsonl", ".lock", "ckpt-000002/manifest.json", "ckpt-000002/model.safetensors",
             "ckpt-000002/state.safetensors", "ckpt-000000/model.safetensors", "ckpt-000002/new-file.json"]
OUTPUT_OPTIONS = ("--json", "--csv", "--plot")
_FORMATS = {"--json": ".json", "--csv": ".csv", "--plot": ".png"}


def _writers() -> list[tuple[str, str]]:
    """(command, output option) for every command that reads a checkpoint and writes a file, read from the CLI."""
    import typer.main

    from cli.main import app

    group = typer.main.get_command(app)
    res = []
    for name, cmd in sorted(group.commands.items()):
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        if name in ("train", "demo", "mechanism"):
            continue  # they read no user file (train's --out is its own run: see the symlink cases)
        res += [(name, o) for o in OUTPUT_OPTIONS if o in opts]
    return res


WRITERS = _writers()
OUTPUT_CASES = [(c, o, f, link) for c, o in WRITERS for f in RUN_FILES for link in (False, True)]
OUTPUT_SAMPLE = _sample(OUTPUT_CASES, key=lambda c: (c[0], c[1]))


def _all_files(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _output_check(bowls_run: Path, tmp_path: Path, command: str, option: str, target: str, link: bool) -> None:
    run = tmp_path / "run"
    shutil.copytree(bowls_run, run)
    (run / ".lock").touch()
    before = _all_files(run)
    path = run / target
    if link:  # a symlink named like a proper output, pointing at the run's file
        path = tmp_path / f"out{_FORMATS[option]}"
        path.symlink_to(run / target)
    t0 = time.time()
    r = invoke_cli(command, *_base_args(command, run, tmp_path), option, path)
    assert_one_line_error(r.exit_code, r.stderr, contains="this command reads")
    assert time.time() - t0 < SECONDS
    assert _all_files(run) == before  # nothing of the run was touched, nothing added to it
    assert not (run / "ckpt-000002" / "new-file.json").exists()


def _oid(c) -> str:
    return f"{c[0]}{c[1]}={c[2]}" + (":link" if c[3] else "")


@pytest.mark.parametrize("command,option,target,link", OUTPUT_SAMPLE, ids=[_oid(c) for c in OUTPUT_SAMPLE])
def test_output_over_run_file_sample(bowls_run, tmp_path, command, option, target, link):
    _output_check(bowls_run, tmp_path, command, option, target, link)


@pytest.mark.hostile_full
@pytest.mark.parametrize("command,option,target,link", OUTPUT_CASES, ids=[_oid(c) for c in OUTPUT_CASES])
def test_output_over_run_file_full(full_set, bowls_run, tmp_path, command, option, target, link):
    _output_check(bowls_run, tmp_path, command, option, target, link)


# every input file of a model trained elsewhere: the weights and each --data / --ood file
INPUT_FILES = ("model", "data", "ood")
INPUT_CASES = [(c, o, f) for c, o in WRITERS for f in INPUT_FILES]
INPUT_SAMPLE = _sample(INPUT_CASES, key=lambda c: c[0])


def _input_check(tmp_path: Path, command: str, option: str, which: str) -> None:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    files = {"model": tmp_path / "m.safetensors", "data": tmp_path / "d.safetensors", "ood": tmp_path / "o.safetensors"}
    save_file(dict(torch.nn.Linear(3, 1).state_dict()), str(files["model"]))
    for k in ("data", "ood"):
        save_file({"x": torch.randn(8, 3), "y": torch.randn(8, 1)}, str(files[k]))
    before = {k: p.read_bytes() for k, p in files.items()}
    ends = [files["model"]] * (2 if command == "connect" else 1)  # connect takes two ends
    r = invoke_cli(command, *ends, "--factory", "torch.nn:Linear", "--trust-remote-code", "--factory-config",
                   '{"in_features": 3, "out_features": 1}', "--data", f"a={files['data']}", "--ood",
                   f"b={files['ood']}", "--device", "cpu", "--out" if command == "plot-surface" else "--seed",
                   str(tmp_path / "s") if command == "plot-surface" else "0", option, files[which])
    assert_one_line_error(r.exit_code, r.stderr, contains="would overwrite")
    assert {k: p.read_bytes() for k, p in files.items()} == before


@pytest.mark.parametrize("command,option,which", INPUT_SAMPLE, ids=[f"{c}{o}={w}" for c, o, w in INPUT_SAMPLE])
def test_output_over_input_file_sample(tmp_path, command, option, which):
    _input_check(tmp_path, command, option, which)


@pytest.mark.hostile_full
@pytest.mark.parametrize("command,option,which", INPUT_CASES, ids=[f"{c}{o}={w}" for c, o, w in INPUT_CASES])
def test_output_over_input_file_full(full_set, tmp_path, command, option, which):
    _input_check(tmp_path, command, option, which)


# -- runs closed under symlinks: every entry of a run replaced by a link out of it, for every reader and --resume --
LINK_ENTRIES = ["ckpt-000002", "ckpt-000000", "latest.json", "metrics.jsonl", "ckpt-000002/manifest.json",
                "ckpt-000002/model.safetensors", "ckpt-000002/state.safetensors"]
READERS = sorted({c for c, _ in WRITERS}) + ["train"]
LINK_CASES = [(c, e) for c in READERS for e in LINK_ENTRIES
              if not (c != "train" and e in ("metrics.jsonl", "ckpt-000000"))] + [("train", ".lock")]
LINK_SAMPLE = _sample(LINK_CASES, key=lambda c: c[1])


def _link_check(bowls_run: Path, tmp_path: Path, command: str, entry: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(bowls_run, run)
    outside = tmp_path / "outside" / Path(entry).name
    outside.parent.mkdir()
    if (run / entry).exists():
        shutil.move(str(run / entry), str(outside))
    else:
        outside.write_text("the user's own file\n")
    (run / entry).symlink_to(outside)
    snap = {p: p.read_bytes() for p in outside.parent.rglob("*") if p.is_file()}
    args = (["--resume", "--out", str(run), "--device", "cpu", "--steps", "4"] if command == "train"
            else _base_args(command, run, tmp_path))
    r = invoke_cli(command, *args)
    assert_one_line_error(r.exit_code, r.stderr, contains="symlink leading out of the")
    assert {p: p.read_bytes() for p in snap} == snap  # the outside copy is never written


@pytest.mark.parametrize("command,entry", LINK_SAMPLE, ids=[f"{c}:{e}" for c, e in LINK_SAMPLE])
def test_run_symlink_out_sample(bowls_run, tmp_path, command, entry):
    _link_check(bowls_run, tmp_path, command, entry)


@pytest.mark.hostile_full
@pytest.mark.parametrize("command,entry", LINK_CASES, ids=[f"{c}:{e}" for c, e in LINK_CASES])
def test_run_symlink_out_full(full_set, bowls_run, tmp_path, command, entry):
    _link_check(bowls_run, tmp_path, command, entry)
