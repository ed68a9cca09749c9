"""The demo's HTML report and figures, built from the summary that `run_demo` computed (no recomputation)."""
from __future__ import annotations

import html
from pathlib import Path

from ..closeness import ClosenessResult
from ..gradsim import GradSimResult
from ..render.demo_curves import ARM_NAMES, training_figure
from ..render.forest import forest_figure
from ..render.geometry import closeness_figure, gradsim_figure
from ..render.mechanism import mechanism_figure
from ..render.style import METRICS, domain_label
from ..render.surface import common_region, compare_figure, html_figure, resolve_levels
from ..render.toys import figure2_plot, trajectory_plot
from ..surface import SurfaceResult
from .mechanism import MechanismResult, sweep_reading
from .report import Report
from .toys import Figure2Result, TrajectoryToyResult

SECTIONS = ["reading", "settings", "mechanism", "figure2", "toy2d", "training", "matched", "speed", "paired",
            "geometry", "surfaces", "views", "data"]
ARMS = ("adamw", "control", "nexus")


def _pm(s: dict) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.4g} ± {s['std']:.2g}"


def _label(key: str) -> str:
    if key.startswith("loss:"):
        return f"loss on {key[5:]}"
    return METRICS.get(key, (key, 0))[0]


def _ci(p: dict) -> str:
    if p["ci_low"] is None:
        return "n/a"
    return f"[{p['ci_low']:+.3g}, {p['ci_high']:+.3g}]"


def _g(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _mean(p: dict) -> str:
    return "n/a" if p.get("mean") is None else f"{p['mean']:+.3g}"


def reading(summary: dict) -> str:
    """What the paired intervals support, nothing else: the same sentence template whichever way they fall."""
    lines = []
    for suite, s in summary["suites"].items():
        seeds = len(s["per_seed"])
        gaps = [g for r in s["per_seed"] for g in r["gaps"].values()]
        flagged = [f"seed {r['seed']}: {', '.join(r['flagged'])}" for r in s["per_seed"] if r["flagged"]]
        conv = s["closeness_converged"]
        lines.append(f"<p><b>{html.escape(suite)}</b> ({seeds} seeds): checkpoints compared at equal training loss, "
                     f"largest pairwise gap {max(gaps):.2g} (tolerance {s['match_tol']:g}); "
                     + (f"<b>pairs above the tolerance: {html.escape('; '.join(flagged))}</b>. " if flagged
                        else "every pair within it. ")
                     + f"Closeness converged on {sum(conv.values())} of {len(conv)} checkpoints"
                     + ("." if all(conv.values()) else "; <b>closeness numbers of the others are not reported</b>.")
                     + "</p><ul>")
        for p in s["paired"]:
            if p["metric"] == "train_loss" or p["metric"].startswith("loss:"):
                continue
            if p["verdict"] in ("above zero", "below zero"):
                lines.append(f"<li>{html.escape(_label(p['metric']))}: {html.escape(p['reading'])}</li>")
        nulls = [p for p in s["paired"] if p["verdict"] == "includes zero" and p["metric"] != "train_loss"
                 and not p["metric"].startswith("loss:")]
        for p in nulls:
            lines.append(f"<li>{html.escape(_label(p['metric']))}, {html.escape(p['arm'])} - "
                         f"{html.escape(p['baseline'])}: {_mean(p)} {_ci(p)}: "
                         + ("exactly zero in every seed" if p.get("sd") == 0 else
                            f"not detectable at this power (MDE {_g(p.get('mde'))})") + "</li>")
        lines.append("</ul>")
        sup = sum(p["verdict"] in ("above zero", "below zero") for p in s["paired"])
        lines.append(f"<p>{sup} of {len(s['paired'])} paired comparisons have a 95% interval that excludes zero; "
                     f"where it includes zero the study could not have seen an effect smaller than its minimum "
                     f"detectable effect (MDE: the true mean difference a two-sided paired t-test on these "
                     f"{seeds} seeds detects with 80% power, from the differences' standard deviation); the forest "
                     f"plot and the full table are below.</p>")
    lines.append(f"<p>Mechanism toy: {html.escape(MechanismResult.from_dict(summary['mechanism']).reading())}</p>")
    if summary.get("mechanism_distance"):
        lines.append(f"<p>Mechanism toy against the start distance: {html.escape(sweep_reading(summary['mechanism_distance']))}</p>")
    return "".join(lines)


def write_report(summary: dict, out: Path) -> Path:
    """Render every figure (PNG beside the report too) and write out/report.html."""
    out = Path(out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    rep = Report("AdamW, the first-order control and Nexus at equal training loss")

    def fig(f, name: str, caption: str) -> None:
        from nexus_opt.files import atomic_path

        with atomic_path(figdir / f"{name}.png", "--out") as tmp:
            f.savefig(tmp, dpi=110, bbox_inches="tight")
        rep.figure(f, caption)

    rep.section("reading", "Reading", "What the paired 95% intervals over seeds support, and nothing else.")
    rep.text(reading(summary), cls="reading")

    rep.section("settings", "Settings, versions and time")
    v = summary["versions"]
    rep.table(["item", "value"], [[k, val] for k, val in v.items()] +
              [["arms", ", ".join(f"{a} = {o}" for a, o in summary["settings"]["arms"].items())],
               ["seeds", ", ".join(map(str, summary["settings"]["seeds"]))],
               ["quick", summary["settings"]["quick"]], ["device", summary["settings"]["device"]],
               ["wall time (s)", round(summary.get("seconds", 0.0), 1)]])
    if summary.get("timings"):
        rep.table(["stage", "wall (s)", "CPU (s)"],
                  [[k, round(t["wall_s"], 1), round(t["cpu_s"], 1)] for k, t in summary["timings"].items()])
    rep.json_block("training and analysis settings (JSON)", summary["settings"])

    rep.section("mechanism", "The mechanism in isolation: a 2-D two-basin toy",
                "Two basins of equal training loss, one where the domains' minima coincide (shared) and one where "
                "they are apart (separated); a held-out downstream domain is low only in the shared basin. AdamW, "
                "the control (Nexus's first-order term alone) and Nexus start on the ridge between them.")
    mech = MechanismResult.from_dict(summary["mechanism"])
    cols = ["arm", "gamma", "n", "frac_shared", "frac_separated", "train_mean", "downstream_mean", "drift_mean"]
    rep.table(cols, [[r.get(c) if r.get(c) is not None else "-" for c in cols] for r in mech.table])
    def ci(v, fmt="+.3g"):
        return "n/a" if not v or v[0] is None else f"[{v[0]:{fmt}}, {v[1]:{fmt}}]"

    rep.table(["gamma", "Nexus - control: shared fraction [95% CI]", "runs (starts) moved in / out",
               "downstream loss [95% CI]", "drift [95% CI]"],
              [[sh["gamma"], f"{sh['d_frac_shared']:+.0%} {ci(sh.get('d_frac_shared_ci'), '+.0%')}",
                f"{sh['n_more_shared']} ({sh.get('starts_more_shared', '?')}) / {sh['n_less_shared']} "
                f"({sh.get('starts_less_shared', '?')})",
                f"{sh['d_downstream']:+.3g} {ci(sh.get('d_downstream_ci'))}",
                f"{sh['d_drift']:+.3g} {ci(sh.get('d_drift_ci'))}"] for sh in mech.shifts],
              caption="Intervals are over starts (t, n_starts - 1 df): the domain orders of one start are not "
                      "independent runs, and AdamW and the control run once per start")
    if mech.expansion_check:
        rep.table(["gamma", "median |exact - first - second| / |second| over starts", "max"],
                  [[e["gamma"], e["median_residual_over_second"], e["max_residual_over_second"]]
                   for e in mech.expansion_check], caption="one outer step's exact mean displacement against the "
                                                           "second-order expansion, at each start")
    rep.text(html.escape(mech.reading()).replace("\n", "<br>"))
    if summary.get("mechanism_distance"):
        sw = summary["mechanism_distance"]
        gs = [p["gamma"] for p in sw[0]["per_gamma"]]
        rep.table(["start distance from the ridge", "runs (starts)", "AdamW",
                   *[f"{arm} gamma={g:g}" for g in gs for arm in ("control", "Nexus")]],
                  [[e["distance"], f"{e['runs']} ({e['n_starts']})", f"{e['adamw']:.0%}",
                    *[f"{p[arm]:.0%}" for p in e["per_gamma"] for arm in ("control", "nexus")]] for e in sw],
                  caption="fraction of runs ending in the shared basin against how far from the ridge they start")
        rep.text(html.escape(sweep_reading(sw)).replace("\n", "<br>"))
    fig(mechanism_figure(mech), "mechanism", "Mechanism toy: contours, basins, sample paths, fractions vs gamma")

    rep.section("figure2", "Figure 2 of the paper, reproduced exactly",
                "Every loss is 8 (x - m)^2 + c; c makes the training loss 1.0 at x = 0.")
    f2 = Figure2Result.from_dict(summary["figure2"])
    rep.table(["configuration", "train minima", "target minimum", "train loss at 0", "target loss at 0"],
              [[p, f"{c['minima']['train1']}, {c['minima']['train2']}", c["minima"]["target"],
                c["train_loss_at_0"], c["target_loss_at_0"]] for p, c in f2.configs.items()])
    rep.text(html.escape(f2.note))
    fig(figure2_plot(f2), "figure2", "Figure 2: sum of minima (left) vs intersection of minima (right)")

    rep.section("toy2d", "A 2-D two-domain toy: AdamW and Nexus paths over the exact per-domain losses")
    toy = TrajectoryToyResult.from_dict(summary["trajectory_toy"])
    rep.table(["optimizer", "training loss", *[f"distance to min {d}" for d in toy.final["adamw"]["distance"]]],
              [[o, f["train_loss"], *f["distance"].values()] for o, f in toy.final.items()])
    fig(trajectory_plot(toy), "toy2d", "Per-domain contours (colours), training loss (grey), optimizer paths")
    rep.text("To first order Nexus's expected displacement is gamma*K*mean_i(u_i) with u_i the unit gradient of "
             "domain i (nexus.md), so its fixed point is where the <i>unit</i> domain gradients cancel, not where "
             "the raw gradients do; on bowls of different curvature that point differs from the training-loss "
             "minimum (black cross). Here the final training loss is "
             f"{toy.final['adamw']['train_loss']:.4g} (AdamW) vs {toy.final['nexus']['train_loss']:.4g} (Nexus). "
             "The paths are exact: each micro-batch is one domain's exact gradient, the domain drawn by the "
             "seeded sampler.")

    rep.section("training", "Training curves and gradient similarity over training",
                "Evaluation training loss, OOD loss and the tracker's mean cross-domain gradient cosine (fixed "
                "evaluation batches, outer weights) against step: mean over seeds, min-max band.")
    for suite, s in summary["suites"].items():
        matched = {a: [(r["matched"][a]["step"], r["matched"][a]["train_loss"]) for r in s["per_seed"]] for a in ARMS}
        fig(training_figure(s["curves"], s["cosine_curves"], s["ood"], title=suite, matched=matched),
            f"curves-{suite}", f"{suite}: losses and mean gradient cosine over training")

    rep.section("matched", "Equal training loss",
                "Per seed, the arm with the highest final training loss sets the target. Every arm is resumed "
                "from its last checkpoint above the window around the target (target ± "
                f"{summary['settings']['match_window']:g}, doubled up to 4x while no triple agrees) and "
                "checkpointed after every step "
                "until a few steps past its first crossing; one checkpoint per arm is then chosen jointly: the "
                "triple whose losses agree within the tolerance and lie closest to the target.")
    for suite, s in summary["suites"].items():
        rows = []
        for r in s["per_seed"]:
            rows.append([r["seed"], r["reference"], r["target"],
                         *[f"{r['matched'][a]['step']} ({r['matched'][a]['train_loss']:.5f})" for a in ARMS],
                         *[r["gaps"][k] for k in ("nexus-adamw", "nexus-control", "control-adamw")],
                         ", ".join(r["flagged"]) or "none"])
        rep.table(["seed", "target set by", "target", *[f"{ARM_NAMES[a]} step (loss)" for a in ARMS],
                   "|nexus-adamw|", "|nexus-control|", "|control-adamw|", f"above {s['match_tol']:g}"], rows,
                  caption=f"{suite}: matched checkpoints")

    rep.section("speed", "Speed (apart from the equal-loss comparison)",
                "Steps each arm needs to reach AdamW's final evaluation training loss (resolution: the evaluation "
                "interval; '-' = not reached within the run), and the paired differences.")
    for suite, s in summary["suites"].items():
        st = s["speed"]["steps"]
        rep.table(["seed", *[ARM_NAMES[a] for a in ARMS]],
                  [[r["seed"], *[st[a][i] if st[a][i] is not None else "-" for a in ARMS]]
                   for i, r in enumerate(s["per_seed"])], caption=suite)
        rep.table(["pair", "mean", "95% CI", "seeds + / - of n", "MDE (80%)", "reading"],
                  [[f"{p['arm']} - {p['baseline']}", "n/a" if p["mean"] is None else p["mean"], _ci(p),
                    f"{p['positive']} / {p['negative']} of {p['n']}", _g(p.get("mde")), p["reading"]]
                   for p in s["speed"]["paired"]])

    rep.section("paired", "Paired differences over seeds",
                "Every metric at the matched checkpoints: per-seed difference, mean, 95% t-interval and how many "
                "seeds agree in sign, and the minimum detectable effect (MDE) at 80% power for the seeds it had. n "
                "counts the seeds where both values exist (an unconverged closeness has none).")
    for suite, s in summary["suites"].items():
        fig(forest_figure(s["paired"], _label, title=suite), f"forest-{suite}",
            f"{suite}: every paired comparison, 95% interval, MDE band")
    for suite, s in summary["suites"].items():
        rows = [[_label(p["metric"]), f"{p['arm']} - {p['baseline']}",
                 ", ".join("-" if d is None else f"{d:+.3g}" for d in p["diffs"]),
                 "n/a" if p["mean"] is None else p["mean"], _ci(p), f"{p['positive']} / {p['negative']} of {p['n']}",
                 _g(p.get("mde")), p["verdict"]] for p in s["paired"]]
        rep.table(["metric", "pair", "per-seed differences", "mean", "95% CI", "seeds + / - of n", "MDE (80%)",
                   "interval"], rows, caption=suite)

    rep.section("geometry", "Geometry at equal training loss, per arm",
                "Flatness (top Hessian eigenvalue, Hutch++ trace), gradient similarity (mean cosine between trained "
                "domains, conflict rate) and closeness (spread of the per-domain minima, Theorem 3.1 bound: "
                "reported only where the checkpoint is a stationary point of the average loss, else n/a), "
                "mean ± std over seeds; closeness objective and convergence per suite below.")
    for suite, s in summary["suites"].items():
        agg = s["aggregate"]
        keys = [k for k in agg["adamw"] if k.startswith("loss:")] + [k for k in METRICS]
        rep.table(["metric", *[ARM_NAMES[a] for a in ARMS]],
                  [[f"loss on {domain_label(k[5:], s['ood'])}" if k.startswith("loss:") else _label(k),
                    *[_pm(agg[a][k]) for a in ARMS]]
                   for k in keys], caption=suite)
        co = s["closeness_objective"]
        conv = s["closeness_converged"]
        rep.text(f"{html.escape(suite)} closeness: parameters {html.escape(str(co.get('params') or 'all'))}, "
                 f"proximal mu {co.get('prox_mu')}, settings {html.escape(str({k: v for k, v in co.items() if k not in ('params', 'prox_mu')}))}; "
                 f"converged on {sum(conv.values())} of {len(conv)} checkpoints"
                 + ("" if all(conv.values()) else
                    f" (<b>did not converge: {html.escape(', '.join(k for k, v in conv.items() if not v))}; their "
                    f"closeness numbers are not reported</b>)") + ".")
        m0 = s["per_seed"][0]["matched"]
        labels = [f"{suite} {ARM_NAMES[a]}" for a in ARMS]
        plan = next((p for p in summary.get("settings", {}).get("plans", []) if p.get("suite") == suite), {})
        n_eval = (plan.get("train", {}).get("suite_options") or {}).get("eval_batches")
        n_small = plan.get("analysis_batches")
        on_all = f"on all {n_eval} evaluation batches per domain" if n_eval else "on every evaluation batch"
        on_small = (f"on the first {n_small} evaluation batch{'es' if n_small != 1 else ''} per domain (those the "
                    "curvature analyses use)" if n_small else "on the curvature analyses' batches")
        differ = (f"; its training loss is therefore not the gradient panel's ({on_all})"
                  if n_small and n_eval and n_small != n_eval else "")
        fig(gradsim_figure([GradSimResult.from_dict(m0[a]["analysis"]["gradsim"]) for a in ARMS], labels),
            f"gradsim-{suite}", f"{suite}: domain gradient cosine matrices at the matched checkpoints (first seed), "
                                f"{on_all}")
        fig(closeness_figure([ClosenessResult.from_dict(m0[a]["analysis"]["closeness"]) for a in ARMS], labels),
            f"closeness-{suite}", f"{suite}: closeness of per-domain minima (first seed), {on_small}{differ}")

    rep.section("surfaces", "Loss surfaces at the matched checkpoints (first seed)",
                "The plane through the checkpoint and the minima of two trained domains that closeness found "
                "(where closeness analyses a parameter subset, the plane lies in that subset, the other parameters "
                "held at the checkpoint; a random filter-normalised plane only where no minima were kept); each "
                "domain's low-loss region is outlined.")
    for suite, s in summary["suites"].items():
        res = [SurfaceResult.load(s["surfaces"][a]) for a in ARMS]
        # a plane so flat that the default level (min + 10% of the training loss) covers nearly all of it shows no
        # outline: then each domain's region is its lowest quarter of its range on the plane, and the caption says so
        flat = min(common_region(r, resolve_levels(r)) for r in res) > 0.9
        level = "range:0.25" if flat else None
        fig(compare_figure(res, [f"{suite} {ARM_NAMES[a]}" for a in ARMS], level=level), f"surface-{suite}",
            f"{suite}: per-domain low-loss regions, " + ", ".join(ARM_NAMES[a] for a in ARMS)
            + ("; the plane is so flat that the default level (min + 10% of the training loss) covers over 90% of "
               "it, so each region is the lowest quarter of its domain's range on the plane" if flat else ""))
        for a, r in zip(ARMS, res):
            rep.plotly(html_figure(r, level=level, label=f"{suite} {ARM_NAMES[a]}"),
                       f"{suite} {ARM_NAMES[a]}: interactive surface (buttons per domain)")

    from .demo_views import report_views  # issue 21: trajectories, sharpness, connectivity
    report_views(rep, fig, summary)

    rep.section("data", "Data", "Everything above is in summary.json beside this report; the paired statistics and "
                "the matched checkpoints are repeated here.")
    rep.json_block("paired differences", {s: v["paired"] for s, v in summary["suites"].items()})
    rep.json_block("matched checkpoints", {s: [{k: r[k] for k in ("seed", "target", "reference", "gaps", "flagged")}
                                               for r in v["per_seed"]] for s, v in summary["suites"].items()})
    rep.json_block("versions and settings", {"versions": summary["versions"], "settings": summary["settings"]})
    return rep.save(out / "report.html")
