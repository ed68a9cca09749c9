"""Checkpoints: a directory of safetensors weights + a JSON manifest, written atomically, never unpickled.

Layout of a run directory::

    run/metrics.jsonl          evaluation and training metrics, one JSON object a line
    run/latest.json            {"checkpoint": "ckpt-000200", "step": 200}
    run/ckpt-000200/manifest.json, model.safetensors, state.safetensors

A manifest carries a SHA-256 of each file and of its own content, so any corruption is caught on load.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

FORMAT = "nexus-landscape-checkpoint"
FORMAT_VERSION = 1
MAX_DEPTH = 64          # nesting of a manifest: deeper is never written by this package
LOCK_NAME = ".lock"     # the writer's lock file inside a run directory (holds the writer's pid)
_STALE = re.compile(r"^\.(ckpt-\d+)\.(tmp|old)-(\d+)$|^\.?(latest\.json|metrics\.jsonl)\.tmp(?:-(\d+))?$")


# -- one writer per run directory ------------------------------------------------------------------
_HELD: dict[str, "RunLock"] = {}


class RunLock:
    """An exclusive OS lock (flock) on run_dir/.lock, held while a run writes; the holder's pid is in the file.

    A second writer fails at once with a UserError naming the holder's pid; readers never take it. On
    acquiring, temporaries left by dead writers (.ckpt-*.tmp-PID, .ckpt-*.old-PID, .latest.json.tmp-PID)
    are cleaned up; an .old- directory whose checkpoint is missing (killed mid-replace) is put back.
    A second writer in the same process is refused too; `reentrant=True` (a save inside a locked run)
    joins the lock this process already holds.
    """

    def __init__(self, run_dir: str | Path, reentrant: bool = False):
        self.run_dir = Path(run_dir)
        self.reentrant = reentrant
        self.fd: int | None = None
        self.nested = False

    def __enter__(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.run_dir)
        if key in _HELD:
            if not self.reentrant:
                raise UserError(f"run directory '{self.run_dir}' is being written by this process (pid {os.getpid()}); "
                                "wait for that run to finish or choose another --out")
            self.nested = True
            return self
        path = self.run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            except OSError:
                holder = "unknown"
            os.close(fd)
            raise UserError(f"run directory '{self.run_dir}' is being written by another process (pid {holder}); "
                            "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        _HELD[key] = self
        try:
            clean_stale(self.run_dir)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.nested or self.fd is None:
            return
        _HELD.pop(os.path.realpath(self.run_dir), None)
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def clean_stale(run_dir: Path) -> list[str]:
    """Remove the temporaries of writers that are gone (call with the run's lock held); returns their names."""
    removed = []
    for p in sorted(Path(run_dir).iterdir()):
        m = _STALE.match(p.name)
        if not m:
            continue
        pid = m.group(3) or m.group(5)
        if pid is not None and int(pid) == os.getpid():
            continue  # every other writer holds the lock while it writes: with ours held, theirs are dead
        if m.group(2) == "old":
            final = Path(run_dir) / m.group(1)
            if not final.exists() and _is_checkpoint_dir(p):  # killed between the two renames: restore it
                os.replace(p, final)
                removed.append(p.name)
                continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


# -- nested state <-> (JSON skeleton, flat tensors) ------------------------------------------------
def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def pack(obj, tensors: dict[str, torch.Tensor], path: str = "s", keep=_cpu_copy, where: str = "a checkpoint"):
    """A JSON skeleton of a nested state; tensors move into `tensors` under path keys, as `keep` returns them
    (default a CPU copy; the sharded save keeps them as they are, so DTensors stay sharded)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = keep(obj)
        return {"__tensor__": path}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors, f"{path}.{i}", keep, where) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, tensors, f"{path}.{i}", keep, where) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: pack(v, tensors, f"{path}.{k}", keep, where) for k, v in obj.items()}
        return {"__items__": [[pack(k, tensors, f"{path}.k{i}", keep, where), pack(v, tensors, f"{path}.{i}", keep, where)]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot store a {type(obj).__name__} in {where} (at {path})")


def unpack(obj, tensors: dict[str, torch.Tensor]):
    """Inverse of `pack`."""
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise UserError(f"checkpoint state refers to a missing tensor '{key}'; the checkpoint is incomplete")
            return tensors[key]
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {unpack(k, tensors): unpack(v, tensors) for k, v in obj["__items__"]}
        return {k: unpack(v, tensors) for k, v in obj.items()}
    return obj


# -- hashing and atomic writes ---------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary file beside `path`, fsync, then rename over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with shared (tied) tensors stored once; returns (tensors, alias -> stored name)."""
    tensors, aliases, seen = {}, {}, {}
    for k, v in model.state_dict(keep_vars=False).items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.device) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().to("cpu").contiguous().clone()
    return tensors, aliases


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, manifest: dict, state) -> Path:
    """Atomically write run_dir/ckpt-<step>/ (weights, resumable state, manifest), then point latest.json at it."""
    run_dir = Path(run_dir)
    with RunLock(run_dir, reentrant=True):
        return _save_checkpoint(run_dir, step, model, manifest, state)


def _save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, manifest: dict, state) -> Path:
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights, aliases = model_tensors(model)
    _save_tensors(weights, tmp / "model.safetensors")
    state_tensors: dict[str, torch.Tensor] = {}
    skeleton = pack(state, state_tensors)
    _save_tensors(state_tensors, tmp / "state.safetensors")
    from . import __version__

    m = dict(manifest)
    m.update(format=FORMAT, format_version=FORMAT_VERSION, step=int(step), package_version=__version__,
             torch_version=torch.__version__, aliases=aliases, state=skeleton,
             files={n: _sha256(tmp / n) for n in ("model.safetensors", "state.safetensors")})
    m["manifest_sha256"] = _manifest_digest(m)
    write_json_atomic(tmp / "manifest.json", m)
    _fsync_dir(tmp)
    old = None
    if final.exists():
        old = run_dir / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    write_json_atomic(run_dir / "latest.json", {"checkpoint": final.name, "step": int(step)})
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# -- reading ---------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A validated checkpoint on disk: its manifest, and lazily its weights and resumable state."""

    path: Path
    manifest: dict

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        try:
            return load_file(str(self.path / name))
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"checkpoint file {self.path / name} is unreadable ({type(e).__name__}); "
                            "use another checkpoint") from None

    def model_state(self) -> dict[str, torch.Tensor]:
        """Weights by state-dict name, tied tensors restored from their aliases."""
        t = self._load("model.safetensors")
        _check_finite(t, self.path / "model.safetensors")
        for alias, name in self.manifest.get("aliases", {}).items():
            if name not in t:
                raise UserError(f"checkpoint {self.path} is inconsistent: alias '{alias}' of missing '{name}'")
            t[alias] = t[name]
        return t

    def state(self):
        """The resumable trainer/optimizer state saved beside the weights."""
        t = self._load("state.safetensors")
        _check_finite(t, self.path / "state.safetensors")
        return unpack(self.manifest["state"], t)


_UNCHECKED = re.compile(r"^(float8|float4|complex|qint|quint|bits|u?int[1-7]$)")


def check_dtype(t: torch.Tensor, name: str, where) -> None:
    """Refuse, by name, a dtype whose values cannot be checked or analysed (float8, complex, quantised, bits)."""
    dt = str(t.dtype).replace("torch.", "")
    if _UNCHECKED.match(dt):
        raise UserError(f"tensor '{str(name)[:120]}' in {where} has dtype {dt}, which is not supported (float8, "
                        "complex and quantised tensors cannot be checked or analysed); save it as float32/bfloat16")


def _check_finite(tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Refuse non-finite floating values: they would give numbers (eigenvalues of NaN) instead of an error."""
    for k, v in tensors.items():
        check_dtype(v, k, where)
        if v.is_floating_point() or v.is_complex():
            if not bool(torch.isfinite(v).all()):
                n = int((~torch.isfinite(v)).sum())
                raise UserError(f"checkpoint tensor '{k}' in {where} has {n} non-finite value(s) (NaN/Inf); "
                                "use an earlier checkpoint of the run")


def _is_checkpoint_dir(p: Path) -> bool:
    return (p / "manifest.json").is_file()


_NAME = re.compile(r"^ckpt-\d{6,}$")


def valid_checkpoint_name(name) -> bool:
    """latest.json may only name a checkpoint directly inside its run directory: 'ckpt-NNNNNN', nothing else
    (no '..', no separators, no absolute path, no hidden temporary)."""
    return isinstance(name, str) and bool(_NAME.match(name))


def _leads_out(entry: Path, root: Path) -> bool:
    """True when `entry` (a path directly inside `root`) resolves, symlinks followed, anywhere but root/<name>."""
    return os.path.realpath(entry) != os.path.join(os.path.realpath(root), entry.name)


def check_closed(run_dir: str | Path) -> None:
    """A run directory is closed under symlinks: latest.json, metrics.jsonl, .lock and every ckpt-* entry (and
    the files of each checkpoint) resolve inside the run, else a UserError naming the entry and where it leads."""
    run = Path(os.path.abspath(run_dir))
    if not run.is_dir():
        return
    entries = [run / n for n in ("latest.json", "metrics.jsonl", LOCK_NAME)]
    entries += sorted(c for c in run.glob("ckpt-*") if valid_checkpoint_name(c.name))
    for e in entries:
        if (e.exists() or e.is_symlink()) and _leads_out(e, run):
            raise UserError(f"run directory {run_dir}: '{e.name}' is a symlink leading out of the run (to "
                            f"{os.path.realpath(e)}); a run must hold its own files: put the file itself there instead of the link")
        if e.is_dir():
            _check_files_inside(e)


def _check_files_inside(d: Path) -> None:
    for n in ("manifest.json", "model.safetensors", "state.safetensors"):
        f = d / n
        if (f.exists() or f.is_symlink()) and _leads_out(f, d):
            raise UserError(f"checkpoint {d}: '{n}' is a symlink leading out of the checkpoint (to "
                            f"{os.path.realpath(f)}); a checkpoint must hold its own files")


def _run_of(d: Path):
    """The run directory holding checkpoint directory `d` (by its path, not its target), else None."""
    parent = Path(os.path.abspath(d)).parent
    if valid_checkpoint_name(Path(os.path.abspath(d)).name) and (
            (parent / "latest.json").exists() or (parent / "metrics.jsonl").exists()):
        return parent
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path or a run directory (its latest, else the newest); every
    path the run leads to must resolve inside it (`check_closed`)."""
    p = Path(path)
    if p.is_dir():
        run = _run_of(p) if _is_checkpoint_dir(p) else p
        if run is not None:
            check_closed(run)
        else:
            _check_files_inside(p)
    return _resolve_checkpoint(p, path)


def _resolve_checkpoint(p: Path, path) -> Path:
    if not p.exists():
        raise UserError(f"no checkpoint at '{path}': the path does not exist; pass a run directory or a ckpt-* directory")
    if p.is_file():
        if p.name == "manifest.json":
            return p.parent
        raise UserError(f"'{path}' is a file; pass a run directory or a ckpt-* directory")
    if _is_checkpoint_dir(p):
        return p
    latest = p / "latest.json"
    if latest.is_file():
        try:
            name = json.loads(latest.read_text())["checkpoint"]
            if valid_checkpoint_name(name) and _is_checkpoint_dir(p / name):
                return p / name
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            pass
    cands = list_checkpoints(p)
    if not cands:
        raise UserError(f"no checkpoint found in '{path}' (no manifest.json, no ckpt-* directory); train first")
    return cands[-1]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every complete ckpt-* directory of a run, by step."""
    return sorted(c for c in Path(run_dir).glob("ckpt-*") if valid_checkpoint_name(c.name) and c.is_dir()
                  and not c.is_symlink() and _is_checkpoint_dir(c))


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open and validate a checkpoint (manifest digest and file hashes); never unpickles anything."""
    d = resolve_checkpoint(path)
    mpath = d / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"checkpoint manifest {mpath} is corrupt ({type(e).__name__}); use another checkpoint") from None
    if _depth(manifest) > MAX_DEPTH:
        raise UserError(f"checkpoint manifest {mpath} is nested more than {MAX_DEPTH} levels deep; use another checkpoint")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{mpath} is not a {FORMAT} manifest; pass a directory written by `landscape train`")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint format version {manifest.get('format_version')!r} is not supported "
                        f"(this version reads {FORMAT_VERSION})")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise UserError(f"checkpoint manifest {mpath} fails its checksum (edited or corrupt); use another checkpoint")
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"checkpoint manifest {mpath} has no valid step ({step!r}); use another checkpoint")
    if valid_checkpoint_name(d.name) and int(d.name[len("ckpt-"):]) != step:
        raise UserError(f"checkpoint manifest {mpath} says step {step} but its directory is {d.name} (edited or "
                        "moved); use another checkpoint")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {"model.safetensors", "state.safetensors"}:
        raise UserError(f"checkpoint manifest {mpath} lists the wrong files; use another checkpoint")
    for name, digest in files.items():
        f = d / name
        if not f.is_file():
            raise UserError(f"checkpoint {d} is missing {name}; use another checkpoint")
        if _sha256(f) != digest:
            raise UserError(f"checkpoint file {f} fails its checksum (corrupt or truncated); use another checkpoint")
    validate_manifest(manifest, mpath)
    return Checkpoint(d, manifest)


def _depth(obj) -> int:
    """Nesting depth of a JSON value, without recursion (a hostile manifest may be nested 100000 deep)."""
    best, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        best = max(best, d)
        if d > MAX_DEPTH:
            return d
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return best


def _expect(cond: bool, mpath: Path, what: str) -> None:
    if not cond:
        raise UserError(f"checkpoint manifest {mpath} is malformed: {what}; use another checkpoint")


def validate_manifest(m: dict, mpath: Path) -> None:
    """The manifest's schema, checked before any field is used (types, required keys, sizes)."""
    aliases = m.get("aliases", {})
    _expect(isinstance(aliases, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()),
            mpath, "'aliases' must map names to names")
    model = m.get("model", {})  # model and suite are optional for the format; `landscape.load` needs them
    _expect(isinstance(model, dict), mpath, "'model' must be an object")
    _expect(isinstance(model.get("config", {}), dict), mpath, "'model.config' must be an object")
    _expect(isinstance(model.get("name", ""), str), mpath, "'model.name' must be a string")
    _expect(model.get("factory") is None or isinstance(model["factory"], str), mpath, "'model.factory' must be a string")
    if "suite" in m:
        suite = m["suite"]
        _expect(isinstance(suite, dict) and {"name", "seed", "weights", "options"} <= set(suite), mpath,
                "'suite' must be an object with name, seed, weights and options")
        _expect(isinstance(suite["name"], str), mpath, "'suite.name' must be a string")
        _expect(isinstance(suite["seed"], int) and not isinstance(suite["seed"], bool), mpath,
                "'suite.seed' must be an integer")
        _expect(suite["weights"] is None or isinstance(suite["weights"], dict), mpath, "'suite.weights' must be an object")
        _expect(isinstance(suite["options"], dict), mpath, "'suite.options' must be an object")
    for key in ("optimizer", "trainer", "metrics", "domains"):
        _expect(isinstance(m.get(key, {}), dict), mpath, f"'{key}' must be an object")
    trainer = m.get("trainer", {})
    _expect(isinstance(trainer.get("config", {}), dict), mpath, "'trainer.config' must be an object")
    _expect(isinstance(m.get("state"), (dict, list)), mpath, "'state' must be an object")
