"""The demo's HTML report and figures, built from the summary that `run_demo` computed (no recomputation)."""
from __future__ import annotations

import html
from pathlib import Path

from ..closeness import ClosenessResult
from ..gradsim import GradSimResult
from ..render.geometry import closeness_figure, gradsim_figure
from ..render.style import METRICS
from ..render.surface import compare_figure, html_figure, panels_figure
from ..render.toys import figure2_plot, trajectory_plot
from ..render.training import curves_plot
from ..surface import SurfaceResult
from .report import Report
from .toys import Figure2Result, TrajectoryToyResult

SECTIONS = ["reading", "settings", "figure2", "toy2d", "training", "matched", "geometry", "surfaces", "data"]

def _pm(s: dict) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.4g} ± {s['std']:.2g}"


def _verdict(a: dict, n: dict, sign: int) -> tuple[str, bool | None]:
    """A plain comparison of Nexus (n) against AdamW (a) over seeds: direction and consistency."""
    va, vn = a["values"], n["values"]
    pairs = [(x, y) for x, y in zip(va, vn) if x is not None and y is not None]
    if not pairs:
        return "not measured", None
    diffs = [y - x for x, y in pairs]
    wins = sum(1 for d in diffs if (d * sign) > 0) if sign else 0
    mean = sum(diffs) / len(diffs)
    word = "higher" if mean > 0 else "lower"
    if sign == 0:
        return f"Nexus {word} by {abs(mean):.3g}", None
    better = wins == len(pairs)
    return (f"Nexus {word} by {abs(mean):.3g} on average; in the predicted direction in {wins}/{len(pairs)} seeds",
            better if wins in (0, len(pairs)) else None)


def reading(summary: dict) -> str:
    """A short plain-language reading of the numbers, saying so when Nexus does not beat AdamW."""
    lines = []
    for suite, s in summary["suites"].items():
        agg = s["aggregate"]
        gaps = [r["pair"]["gap"] for r in s["per_seed"]]
        lines.append(f"<p><b>{html.escape(suite)}</b> ({len(gaps)} seeds): checkpoints matched at training loss "
                     f"within {max(gaps):.3g}. ")
        for key in ("ood_loss", "mean_cosine", "spread", "top_eigenvalue"):
            label, sign = METRICS[key]
            text, better = _verdict(agg["adamw"][key], agg["nexus"][key], sign)
            tail = {True: " (as the paper predicts)", False: " (against the paper's prediction)",
                    None: " (mixed across seeds)"}[better]
            lines.append(f"{label}: {text}{tail}. ")
        text, better = _verdict(agg["adamw"]["ood_loss"], agg["nexus"]["ood_loss"], -1)
        if better is not True:
            lines.append("<b>Nexus does not beat AdamW on OOD loss at matched training loss in every seed here.</b> ")
        fa, fn = agg["adamw"]["final_train_loss"], agg["nexus"]["final_train_loss"]
        lines.append(f"At the end of training the training loss is {_pm(fa)} (AdamW) vs {_pm(fn)} (Nexus).</p>")
    f2 = summary["figure2"]["configs"]
    lines.append(f"<p>Figure 2 toy: both configurations have training loss "
                 f"{f2['fig2-sum']['train_loss_at_0']:.2f} at x = 0, but target loss "
                 f"{f2['fig2-sum']['target_loss_at_0']:.2f} (sum of minima; the paper prints 2.67) vs "
                 f"{f2['fig2-intersection']['target_loss_at_0']:.2f} (intersection).</p>")
    return "".join(lines)


def write_report(summary: dict, out: Path) -> Path:
    """Render every figure (PNG beside the report too) and write out/report.html."""
    out = Path(out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    rep = Report("Nexus vs AdamW: where do they land?")

    def fig(f, name: str, caption: str) -> None:
        f.savefig(figdir / f"{name}.png", dpi=110, bbox_inches="tight")
        rep.figure(f, caption)

    rep.section("reading", "Reading", "What the numbers below say, in plain words.")
    rep.text(reading(summary), cls="reading")

    rep.section("settings", "Settings and versions")
    v = summary["versions"]
    rep.table(["item", "value"], [[k, val] for k, val in v.items()] +
              [["seeds", ", ".join(map(str, summary["settings"]["seeds"]))],
               ["quick", summary["settings"]["quick"]], ["device", summary["settings"]["device"]],
               ["wall time (s)", round(summary.get("seconds", 0.0), 1)]])
    rep.json_block("training and analysis settings (JSON)", summary["settings"])

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

    rep.section("training", "Training curves", "Per-domain evaluation loss (OOD included), mean over seeds with "
                "min-max band; dots mark the checkpoints matched by training loss (first seed).")
    for suite, s in summary["suites"].items():
        p = s["per_seed"][0]["pair"]
        fig(curves_plot(s["curves"], s["ood"], title=suite,
                        matched={"adamw": (p["a_step"], p["a_train_loss"]), "nexus": (p["b_step"], p["b_train_loss"])}),
            f"curves-{suite}", f"{suite}: evaluation loss per domain")

    rep.section("matched", "Matched training loss vs final checkpoints")
    for suite, s in summary["suites"].items():
        rows = []
        for r in s["per_seed"]:
            p = r["pair"]
            rows.append([r["seed"], p["a_step"], p["a_train_loss"], p["b_step"], p["b_train_loss"], p["gap"],
                         p["final_a_train_loss"], p["final_b_train_loss"]])
        rep.table(["seed", "AdamW step", "AdamW train", "Nexus step", "Nexus train", "gap", "final AdamW train",
                   "final Nexus train"], rows, caption=f"{suite}: matched pairs")
        agg = s["aggregate"]
        keys = [k for k in agg["adamw"] if k.startswith("loss:")] + ["ood_loss", "train_loss"]
        rep.table(["loss at matched checkpoints", "AdamW", "Nexus"],
                  [[k.replace("loss:", "") + (" (OOD)" if k[5:] in s["ood"] else ""), _pm(agg["adamw"][k]),
                    _pm(agg["nexus"][k])] for k in keys], caption=f"{suite}: per-domain loss, mean ± std over seeds")
        fin = s["per_seed"][0]["final"]
        rep.table(["loss at final checkpoints (first seed)", "AdamW", "Nexus"],
                  [[d, fin["adamw"][d], fin["nexus"][d]] for d in fin["adamw"]])

    rep.section("geometry", "Geometry at matched training loss",
                "Flatness (top Hessian eigenvalue, trace: Hutch++ with its standard error), gradient similarity "
                "(mean cosine between trained domains, conflict rate) and closeness (spread of the per-domain "
                "minima, Theorem 3.1 bound), mean ± std over seeds.")
    for suite, s in summary["suites"].items():
        agg = s["aggregate"]
        rows = [[label, _pm(agg["adamw"][k]), _pm(agg["nexus"][k]),
                 _verdict(agg["adamw"][k], agg["nexus"][k], sign)[0]] for k, (label, sign) in METRICS.items()]
        rep.table(["metric", "AdamW", "Nexus", "comparison"], rows, caption=f"{suite}")
        m0 = s["per_seed"][0]["matched"]
        labels = [f"{suite} AdamW", f"{suite} Nexus"]
        f = gradsim_figure([GradSimResult.from_dict(m0[o]["gradsim"]) for o in ("adamw", "nexus")], labels)
        fig(f, f"gradsim-{suite}", f"{suite}: domain gradient cosine matrices (first seed)")
        f = closeness_figure([ClosenessResult.from_dict(m0[o]["closeness"]) for o in ("adamw", "nexus")], labels)
        fig(f, f"closeness-{suite}", f"{suite}: closeness of per-domain minima (first seed)")

    rep.section("surfaces", "Loss surfaces: sum vs intersection of minima",
                "The plane through the checkpoint and the minima of two trained domains; each domain's "
                "low-loss region is outlined so that their overlap (or its absence) is visible.")
    for suite, s in summary["suites"].items():
        res = [SurfaceResult.load(s["surfaces"][o]) for o in ("adamw", "nexus")]
        fig(compare_figure(res, [f"{suite} AdamW", f"{suite} Nexus"]), f"surface-{suite}",
            f"{suite}: per-domain low-loss regions, AdamW (left) vs Nexus (right)")
        for o, r in zip(("AdamW", "Nexus"), res):
            fig(panels_figure(r), f"surface-{suite}-{o.lower()}-panels", f"{suite} {o}: every domain's loss on the plane")
            rep.plotly(html_figure(r, label=f"{suite} {o}"), f"{suite} {o}: interactive surface (buttons per domain)")

    rep.section("data", "Data", "Everything above is in summary.json beside this report; the aggregates and the "
                "matched pairs are repeated here.")
    rep.json_block("aggregates (mean, std and per-seed values of every metric)",
                   {s: v["aggregate"] for s, v in summary["suites"].items()})
    rep.json_block("matched pairs", {s: [r["pair"] for r in v["per_seed"]] for s, v in summary["suites"].items()})
    rep.json_block("versions and settings", {"versions": summary["versions"], "settings": summary["settings"]})
    return rep.save(out / "report.html")
