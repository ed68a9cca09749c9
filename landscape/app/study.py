"""A dose-response study of Nexus against its first-order control, with the power to see the mechanism.

On `mix`, over paired seeds: the control (Nexus parallel mode: the same K normalised gradients at the anchor)
and Nexus at a grid of gamma, plus the K = 1 null where both modes are the same algorithm. Each (seed, gamma)
pair is compared at equal training loss (landscape.app.matching); at the matched checkpoints the losses, the
mean cross-domain gradient cosine and the exact alignment rate (landscape.alignment) are measured; paired
intervals carry their minimum detectable effect. The predictions are fixed in code before any run
(`PREDICTIONS`) and each is read off the results as held / not detectable / contradicted."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

from nexus_opt.checkpoint import list_checkpoints, read_checkpoint
from nexus_opt.errors import UserError
from nexus_opt.train import TrainConfig, train

from ..alignment import alignment
from ..gradsim import gradient_similarity
from ..load import load
from .matching import MATCH_TOL, match_runs
from .runs import eval_records, gradsim_records
from .stats import paired

NULL_TOL = 1e-5  # K = 1: the two modes are one algorithm; their float32 arithmetic differs only in rounding

PREDICTIONS = [
    ("null", "At K = 1 Nexus and the control are the same algorithm: every paired difference is zero "
             f"(within float32 rounding, |difference| <= {NULL_TOL:g})."),
    ("rate_positive", "At the matched checkpoints the mean cross-domain cosine rises faster along Nexus's "
                      "expected step than along the control's (alignment rate difference > 0) at every gamma."),
    ("rate_grows", "That rate difference grows with gamma."),
    ("rate_fixed_point", "At the control's matched checkpoint (the same trained point for every gamma of a seed) the "
                         "rate difference is positive at every gamma and grows with gamma in every seed."),
    ("cosine_positive", "At equal training loss Nexus's mean cross-domain gradient cosine is higher than the "
                        "control's, the more so the larger gamma."),
    ("ood_lower", "At equal training loss Nexus's OOD loss is lower than the control's."),
    ("end_cosine", "At the end of training (same steps, not equal loss) Nexus's tracked gradient cosine is higher "
                   "than the control's."),
]


@dataclasses.dataclass
class StudyConfig:
    """The study's plan: `study_preset(quick)` gives the defaults of `landscape study [--quick]`."""

    out: str = "study"
    device: str = "cpu"
    seeds: tuple = tuple(range(15))
    gammas: tuple = (0.02, 0.05, 0.1, 0.2)
    null_gamma: float = 0.1
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields shared by every run
    gradsim_every: int = 10
    alignment_samples: int = 128  # sampled orders where N^K exceeds the exact limit
    quick: bool = False


def study_preset(quick: bool = False, out: str = "study", device: str = "cpu", seeds=None, gammas=None) -> StudyConfig:
    """The full study (15 seeds, 4 gammas, K = 6; sized for 15 minutes on 2 CPU cores) or a quick one for tests."""
    opts = {"eval_batches": 2, "eval_batch_size": 32}
    if quick:
        tr = dict(suite="mix", suite_options=opts, steps=30, batch_size=16, accum=3, warmup=3, lr=0.01,
                  weight_decay=0.0, eval_every=3, ckpt_every=6)
        return StudyConfig(out, device, tuple(seeds or (0, 1)), tuple(gammas or (0.05, 0.2)), 0.1, tr,
                           gradsim_every=5, alignment_samples=64, quick=True)
    tr = dict(suite="mix", suite_options=opts, steps=120, batch_size=64, accum=6, warmup=10, lr=0.01,
              weight_decay=0.0, eval_every=5, ckpt_every=10)
    return StudyConfig(out, device, tuple(seeds or range(15)), tuple(gammas or (0.02, 0.05, 0.1, 0.2)), 0.1, tr)


def _run(cfg: StudyConfig, name: str, optimizer: str, gamma: float, seed: int, log: Callable, **over) -> Path:
    """Train (or reuse a finished) run `name`, the gradient-similarity tracker on."""
    from .demo import SuitePlan, _tracker

    out = Path(cfg.out) / "runs" / name
    tc = TrainConfig(**{**cfg.train, **over}, optimizer=optimizer, inner_lr=gamma, seed=seed, device=cfg.device,
                     out=str(out))
    if list_checkpoints(out):
        last = read_checkpoint(out)
        saved = dict(last.manifest.get("trainer", {}).get("config") or {})
        want = json.loads(json.dumps(dataclasses.asdict(tc)))
        same = all(saved.get(k) == v for k, v in want.items() if k not in ("out", "device"))
        if same and last.step >= tc.steps:
            log(f"reuse {name}")
            return out
    if out.exists():
        shutil.rmtree(out)
    log(f"train {name}")
    plan = SuitePlan(tc.suite, {}, {}, {}, gradsim_every=cfg.gradsim_every)
    train(tc, on_step_record=_tracker(tc, plan))
    return out


def _final_loss(run: Path) -> float:
    return float(read_checkpoint(list_checkpoints(run)[-1]).manifest["metrics"]["train_loss"])


def _copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a run (its matching writes a dense window beside it)."""
    if dst.exists() and (dst / "metrics.jsonl").read_bytes() == (src / "metrics.jsonl").read_bytes():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock", "lock"))
    return dst


def _measure(path: str, cfg: StudyConfig, gamma: float, K: int, seed: int) -> dict:
    """Losses, mean gradient cosine and the alignment rate (at this gamma and K) of one matched checkpoint."""
    obj = load(path, device=cfg.device)
    losses = obj.losses()
    gs = gradient_similarity(obj, seed=seed, per_layer=False, resamples=0)
    al = alignment(obj, gammas=[gamma], K=K, seed=seed, samples=cfg.alignment_samples)
    row = al.per_gamma[0]
    return {"path": path, "losses": losses, "ood_loss": statistics.fmean(losses[d] for d in obj.ood),
            "mean_cosine": gs.mean_offdiag_cosine, "rate_nexus": row["rate_cosine"]["nexus"],
            "rate_control": row["rate_cosine"]["control"], "rate_difference": row["rate_cosine"]["difference"],
            "rate_stderr": (row.get("stderr") or {}).get("rate_cosine.difference"),
            "remainder_over_second": row["remainder_over_second"], "alignment_exact": al.exact}


METRICS = ("train_loss", "ood_loss", "mean_cosine", "rate_difference")
END_METRICS = ("end:train_loss", "end:ood_loss", "end:mean_cosine")  # at the last step: not at equal loss
METRIC_LABELS = {"train_loss": "training loss (matched)", "ood_loss": "OOD loss", "mean_cosine":
                 "mean cross-domain gradient cosine", "rate_difference": "alignment rate difference at Nexus's checkpoint",
                 "rate_difference@control": "alignment rate difference at the control's checkpoint",
                 "end:train_loss": "training loss at the end (not matched)",
                 "end:ood_loss": "OOD loss at the end (not matched)",
                 "end:mean_cosine": "gradient cosine at the end (tracker; not matched)"}


def _end(run: Path) -> dict:
    """The last evaluation's training and OOD losses and the tracker's last mean cosine of a run."""
    ev = eval_records(run)[-1]
    cos = gradsim_records(run)
    ood = [v for d, v in ev["losses"].items() if d == "ood"] or [None]
    return {"end:train_loss": ev["train_loss"], "end:ood_loss": ood[0],
            "end:mean_cosine": cos[-1]["mean_cosine"] if cos else None}


def _value(m: dict, key: str):
    return m["losses"]["train"] if key == "train_loss" else m.get(key)


def _arm_pair(cfg: StudyConfig, runs: dict, arm: str, base: str, gamma: float, K: int, seed: int, log) -> dict:
    """Match two runs at equal training loss (the slower one's final loss) and measure both checkpoints."""
    target = max(_final_loss(runs[arm]), _final_loss(runs[base]))
    matched = match_runs({arm: runs[arm], base: runs[base]}, target, cfg.device, log)
    gap = abs(matched[arm]["train_loss"] - matched[base]["train_loss"])
    return {"target": target, "gap": gap, "flagged": gap > MATCH_TOL,
            "matched": {a: {**matched[a], "metrics": _measure(matched[a]["path"], cfg, gamma, K, seed)}
                        for a in (arm, base)}}


def run_study(cfg: StudyConfig, log: Callable[[str], None] = lambda m: None) -> dict:
    """Train, match, measure and pair; returns the summary (also written to out/study.json with the report)."""
    if len(cfg.seeds) < 2:
        raise UserError("the study needs at least 2 seeds for a paired interval")
    gammas = sorted(float(g) for g in cfg.gammas)
    if not gammas or any(not (0 < g < 10) for g in gammas) or len(set(gammas)) != len(gammas):
        raise UserError(f"gammas must be distinct numbers in (0, 10), got {list(cfg.gammas)}")
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    K = int(cfg.train["accum"])
    per_seed = []
    for s in cfg.seeds:
        log(f"seed {s}")
        # Under the outer Adam (eps 1e-10, far below the displacement's elements) the control is the same for
        # every gamma: one control run per seed serves the grid (a copy per gamma is matched).
        ctrl = _run(cfg, f"control-s{s}", "nexus-parallel", max(gammas), s, log)
        rec = {"seed": s, "gammas": {}}
        for g in gammas:
            nx = _run(cfg, f"nexus-g{g:g}-s{s}", "nexus", g, s, log)
            cp = _copy_run(ctrl, out / "runs" / f"control-g{g:g}-s{s}")
            rec["gammas"][f"{g:g}"] = _arm_pair(cfg, {"nexus": nx, "control": cp}, "nexus", "control", g, K, s, log)
            rec["gammas"][f"{g:g}"]["end"] = {"nexus": _end(nx), "control": _end(ctrl)}
        n1 = _run(cfg, f"nexus-K1-s{s}", "nexus", cfg.null_gamma, s, log, accum=1)
        c1 = _run(cfg, f"control-K1-s{s}", "nexus-parallel", cfg.null_gamma, s, log, accum=1)
        rec["null"] = _arm_pair(cfg, {"nexus": n1, "control": c1}, "nexus", "control", cfg.null_gamma, 1, s, log)
        rec["null"]["end"] = {"nexus": _end(n1), "control": _end(c1)}
        per_seed.append(rec)
    seeds = [r["seed"] for r in per_seed]

    def pairs_for(get, arm_name, base_name):
        out_ = []
        for k in METRICS:
            a = [_value(get(r)["matched"]["nexus"]["metrics"], k) for r in per_seed]
            b = [_value(get(r)["matched"]["control"]["metrics"], k) for r in per_seed]
            if k == "rate_difference":  # one quantity per checkpoint, against zero: at Nexus's and the control's
                out_.append(paired(k, arm_name, "zero", seeds, a, [0.0] * len(a)).to_dict())
                out_.append(paired("rate_difference@control", arm_name, "zero", seeds, b, [0.0] * len(b)).to_dict())
            else:
                out_.append(paired(k, arm_name, base_name, seeds, a, b).to_dict())
        for k in END_METRICS:
            a, b = ([get(r)["end"][x][k] for r in per_seed] for x in ("nexus", "control"))
            out_.append(paired(k, arm_name, base_name, seeds, a, b).to_dict())
        return out_

    comparisons = []
    for g in gammas:
        for p in pairs_for(lambda r, g=g: r["gammas"][f"{g:g}"], f"nexus gamma={g:g}", "control"):
            comparisons.append({**p, "gamma": g, "K": K})
    null = [{**p, "gamma": cfg.null_gamma, "K": 1}
            for p in pairs_for(lambda r: r["null"], "nexus K=1", "control K=1")]
    curves = _curves(cfg, gammas)
    summary = {"settings": {**dataclasses.asdict(cfg), "K": K, "match_tol": MATCH_TOL, "null_tol": NULL_TOL,
                            "control": "one nexus-parallel run per seed serves every gamma (outer Adam is "
                                       "scale-free: eps 1e-10)"},
               "predictions": [{"id": i, "text": t} for i, t in PREDICTIONS],
               "per_seed": per_seed, "comparisons": comparisons, "null": null, "curves": curves,
               "null_max_abs_diff": _null_max(per_seed)}
    summary["outcomes"] = outcomes(summary)
    summary["seconds"] = time.time() - t0
    from .study_report import write_study_report

    summary["report"] = str(write_study_report(summary, out))
    summary["seconds"] = time.time() - t0
    (out / "study.json").write_text(json.dumps(summary, indent=1, allow_nan=False, default=_nan) + "\n")
    return summary


def _nan(x):
    return None


def _null_max(per_seed: list) -> dict:
    """Largest |Nexus - control| over seeds of each metric at K = 1 (the rate difference itself: 0 at K = 1)."""
    out = {}
    for k in METRICS:
        vals = []
        for r in per_seed:
            a, b = (_value(r["null"]["matched"][x]["metrics"], k) for x in ("nexus", "control"))
            vals.append(abs(a) if k == "rate_difference" else abs(a - b))
        out[k] = max(vals)
    for k in END_METRICS:
        out[k] = max(abs(r["null"]["end"]["nexus"][k] - r["null"]["end"]["control"][k]) for r in per_seed)
    return out


def _curves(cfg: StudyConfig, gammas) -> dict:
    """Tracker cosine rows per arm (control, nexus per gamma, the K = 1 pair), per seed."""
    runs = Path(cfg.out) / "runs"
    names = {"control": "control-s{s}", **{f"nexus gamma={g:g}": f"nexus-g{g:g}-s{{s}}" for g in gammas},
             "control K=1": "control-K1-s{s}", "nexus K=1": "nexus-K1-s{s}"}
    return {arm: [gradsim_records(runs / pat.format(s=s)) for s in cfg.seeds] for arm, pat in names.items()} | {
        "_loss": {arm: [[{"step": r["step"], "train_loss": r["train_loss"]} for r in eval_records(runs / pat.format(s=s))]
                        for s in cfg.seeds] for arm, pat in names.items()}}


def _find(comps: list, metric: str, gamma: float) -> dict:
    return next(c for c in comps if c["metric"] == metric and math.isclose(c["gamma"], gamma))


def _ci_text(p: dict) -> str:
    return "" if p.get("ci_low") is None else f"[{p['ci_low']:+.3g}, {p['ci_high']:+.3g}]"


def _word(p: dict, sign: int) -> str:
    """held / contradicted / not detectable for a prediction of sign `sign` on one paired comparison."""
    v = p["verdict"]
    if v == ("above zero" if sign > 0 else "below zero"):
        return "held"
    if v in ("above zero", "below zero"):
        return "contradicted"
    mde = p.get("mde")
    return "not detectable at this power" + ("" if mde is None else f" (MDE {mde:.3g})")


def outcomes(summary: dict) -> list[dict]:
    """Each prediction read off the results, in the same words whichever way they fall."""
    comps, gammas = summary["comparisons"], sorted({c["gamma"] for c in summary["comparisons"]})
    res = []
    mx = summary["null_max_abs_diff"]
    ok = all(v <= NULL_TOL for v in mx.values())
    res.append({"id": "null", "outcome": "held" if ok else "contradicted",
                "detail": "largest |Nexus - control| at K = 1: " + ", ".join(f"{k} {v:.2g}" for k, v in mx.items())})
    rate = [_find(comps, "rate_difference", g) for g in gammas]
    words = [_word(p, +1) for p in rate]
    res.append({"id": "rate_positive",
                "outcome": "held" if all(w == "held" for w in words) else
                "contradicted" if any(w == "contradicted" for w in words) else "partly: " + "; ".join(
                    f"gamma {g:g} {w}" for g, w in zip(gammas, words)),
                "detail": "; ".join(f"gamma {g:g}: {p['mean']:+.3g} [{p['ci_low']:+.3g}, {p['ci_high']:+.3g}] ({w})"
                                    for g, p, w in zip(gammas, rate, words) if p["mean"] is not None)})
    means = [p["mean"] for p in rate]
    grows = all(m is not None for m in means) and all(b > a for a, b in zip(means, means[1:]))
    top, low = rate[-1], rate[0]
    sep = grows and top["ci_low"] is not None and low["ci_high"] is not None and top["ci_low"] > low["ci_high"]
    res.append({"id": "rate_grows", "outcome": ("held" if sep else "held in the means (intervals overlap)" if grows
                                                else "contradicted" if len(means) > 1 else "not tested"),
                "detail": "means " + ", ".join("n/a" if m is None else f"{m:+.3g}" for m in means)})
    fixed = [_find(comps, "rate_difference@control", g) for g in gammas]
    fw = [_word(p, +1) for p in fixed]
    per_seed_vals = list(zip(*[p["diffs"] for p in fixed]))  # per seed: the rates over gamma
    mono = sum(all(v is not None for v in row) and all(b > a for a, b in zip(row, row[1:])) for row in per_seed_vals)
    pos = all(w == "held" for w in fw)
    res.append({"id": "rate_fixed_point",
                "outcome": ("held" if pos and mono == len(per_seed_vals) else
                            "contradicted" if any(w == "contradicted" for w in fw) else
                            f"partly: interval above zero at {sum(w == 'held' for w in fw)} of {len(fw)} gammas; "
                            f"grows with gamma in {mono} of {len(per_seed_vals)} seeds"),
                "detail": "; ".join(f"gamma {g:g}: {p['mean']:+.3g} {_ci_text(p)} ({w})"
                                    for g, p, w in zip(gammas, fixed, fw) if p["mean"] is not None)
                          + f"; grows with gamma in {mono} of {len(per_seed_vals)} seeds"})
    cos = [_find(comps, "mean_cosine", g) for g in gammas]
    res.append({"id": "cosine_positive", "outcome": "; ".join(f"gamma {g:g} {_word(p, +1)}" for g, p in zip(gammas, cos)),
                "detail": "; ".join(p["reading"] for p in cos)})
    ood = [_find(comps, "ood_loss", g) for g in gammas]
    res.append({"id": "ood_lower", "outcome": "; ".join(f"gamma {g:g} {_word(p, -1)}" for g, p in zip(gammas, ood)),
                "detail": "; ".join(p["reading"] for p in ood)})
    end = [_find(comps, "end:mean_cosine", g) for g in gammas]
    res.append({"id": "end_cosine", "outcome": "; ".join(f"gamma {g:g} {_word(p, +1)}" for g, p in zip(gammas, end)),
                "detail": "; ".join(p["reading"] for p in end)})
    return res
