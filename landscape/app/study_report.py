"""The dose-response study's HTML report: the predictions first, then what held, the figures (cosine over
training with bands, dose-response, forest plot) and the tables as data."""
from __future__ import annotations

import html
from pathlib import Path

from ..render.forest import forest_figure
from ..render.study import cosine_curves_figure, dose_response_figure
from .report import Report
from .study import METRIC_LABELS, PREDICTIONS


def _label(k: str) -> str:
    return METRIC_LABELS.get(k, k)


def _ci(p: dict) -> str:
    return "n/a" if p.get("ci_low") is None else f"[{p['ci_low']:+.3g}, {p['ci_high']:+.3g}]"


def write_study_report(summary: dict, out: Path) -> Path:
    out = Path(out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    st = summary["settings"]
    rep = Report("Dose-response: Nexus against its first-order control over gamma, with the K = 1 null")

    def fig(f, name, caption):
        f.savefig(figdir / f"{name}.png", dpi=110, bbox_inches="tight")
        rep.figure(f, caption)

    rep.section("predictions", "Predictions (fixed in code before any run)",
                f"Suite {html.escape(st['train']['suite'])}, K = {st['K']}, {len(st['seeds'])} paired seeds, gamma "
                f"{', '.join(f'{g:g}' for g in st['gammas'])}; the K = 1 null at gamma {st['null_gamma']:g}.")
    rep.text("<ol>" + "".join(f"<li>{html.escape(t)}</li>" for _, t in PREDICTIONS) + "</ol>")

    rep.section("outcomes", "Which held",
                "Read off the paired 95% intervals over seeds at equal training loss; where an interval includes "
                "zero the minimum detectable effect (80% power, these seeds) says what the study could have seen.")
    texts = dict(PREDICTIONS)
    rep.text("<ul>" + "".join(f"<li><b>{html.escape(o['outcome'])}</b>: {html.escape(texts[o['id']])} "
                              f"<br><small>{html.escape(o['detail'])}</small></li>" for o in summary["outcomes"])
             + "</ul>")
    rep.text(f"Wall time {summary.get('seconds', 0):.0f} s.")

    rep.section("figures", "Pictures")
    fig(dose_response_figure(summary), "study-dose", "Nexus - control against gamma (mean, 95% CI, MDE band), and "
                                                    "the K = 1 null")
    fig(cosine_curves_figure(summary), "study-cosine",
        "Mean cross-domain gradient cosine over training (tracker, outer weights): mean over seeds, 95% band")
    allp = summary["comparisons"] + summary["null"]
    fig(forest_figure(allp, _label, title="study"), "study-forest",
        "Every paired comparison: 95% interval, MDE band (rate difference: Nexus's checkpoint against zero)")

    rep.section("tables", "Data")
    rep.table(["metric", "pair", "K", "mean", "95% CI", "seeds + / - of n", "MDE (80%)", "reading"],
              [[_label(p["metric"]), f"{p['arm']} - {p['baseline']}", p["K"],
                "n/a" if p["mean"] is None else p["mean"], _ci(p), f"{p['positive']} / {p['negative']} of {p['n']}",
                "n/a" if p.get("mde") is None else f"{p['mde']:.3g}", p["reading"]] for p in allp])
    rows = []
    for r in summary["per_seed"]:
        for g, v in list(r["gammas"].items()) + [("K=1", r["null"])]:
            m = v["matched"]
            rows.append([r["seed"], g, f"{v['target']:.5f}", f"{m['nexus']['step']} / {m['control']['step']}",
                         f"{v['gap']:.2g}" + (" FLAGGED" if v["flagged"] else ""),
                         f"{m['nexus']['metrics']['rate_difference']:+.3g}"
                         if m["nexus"]["metrics"]["rate_difference"] is not None else "n/a"])
    rep.table(["seed", "gamma", "target loss", "matched step nexus / control", "|gap|", "rate difference (nexus ckpt)"],
              rows, caption="matched checkpoints")
    rep.json_block("settings", st)
    return rep.save(out / "report.html")
