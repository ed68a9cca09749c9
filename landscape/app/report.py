"""A self-contained HTML report: sections of text, tables, static figures (inline PNG) and plotly figures.

Everything is inlined (images as base64, plotly.js once), so the file opens offline. A small script
records script errors in `body[data-errors]` and sets `body[data-rendered]` once the plotly figures
have drawn, which the browser test reads.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

_HEAD = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<script>window.__errors=[];window.addEventListener('error',function(e){{window.__errors.push(String(e.message));
document.documentElement.setAttribute('data-errors',window.__errors.length);}});</script>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}
h1{{border-bottom:2px solid #444}}h2{{margin-top:2em;border-bottom:1px solid #aaa}}
table{{border-collapse:collapse;margin:1em 0;font-size:.9em}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}
th{{background:#f0f0f0}}td:first-child,th:first-child{{text-align:left}}figure{{margin:1em 0}}
figcaption{{color:#555;font-size:.9em}}img{{max-width:100%}}.reading{{background:#f6f8fa;padding:1em;border-left:4px solid #4a7}}
details pre{{max-height:30em;overflow:auto;background:#f6f6f6;padding:.5em;font-size:.8em}}nav a{{margin-right:1em}}</style>
</head><body>
"""
_TAIL = """<script>(function(){var n=0;function done(){var gs=document.querySelectorAll('.plotly-graph-div');
var ok=Array.prototype.every.call(gs,function(g){return g._fullLayout!==undefined||g.querySelector('.main-svg');});
if(ok||n++>100){document.body.setAttribute('data-rendered', ok?'ok':'timeout');
document.body.setAttribute('data-figures', gs.length+document.querySelectorAll('figure img').length);}
else setTimeout(done,100);}window.addEventListener('load',done);})();</script></body></html>"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


class Report:
    """Build an HTML report section by section; `save(path)` writes one self-contained file."""

    def __init__(self, title: str):
        self.title, self.parts, self.sections, self._plotly_js = title, [], [], False

    def section(self, sid: str, title: str, intro: str = "") -> None:
        self.sections.append((sid, title))
        self.parts.append(f'<h2 id="{sid}">{html.escape(title)}</h2>')
        if intro:
            self.parts.append(f"<p>{intro}</p>")

    def text(self, html_text: str, cls: str = "") -> None:
        self.parts.append(f'<div class="{cls}">{html_text}</div>' if cls else f"<p>{html_text}</p>")

    def table(self, headers: list[str], rows: list[list], caption: str = "") -> None:
        h = "".join(f"<th>{html.escape(str(x))}</th>" for x in headers)
        body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}<thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, fig, caption: str = "") -> None:
        """A matplotlib figure as an inline PNG."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        data = base64.b64encode(buf.getvalue()).decode()
        self.parts.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def plotly(self, fig, caption: str = "") -> None:
        """An interactive plotly figure; plotly.js is inlined once, with the first figure."""
        div = fig.to_html(full_html=False, include_plotlyjs=not self._plotly_js)
        self._plotly_js = True
        self.parts.append(f"<figure>{div}<figcaption>{html.escape(caption)}</figcaption></figure>")

    def json_block(self, title: str, data) -> None:
        self.parts.append(f"<details><summary>{html.escape(title)}</summary><pre>"
                          f"{html.escape(json.dumps(data, indent=1))}</pre></details>")

    def html(self) -> str:
        nav = "<nav>" + "".join(f'<a href="#{s}">{html.escape(t)}</a>' for s, t in self.sections) + "</nav>"
        return (_HEAD.format(title=html.escape(self.title)) + f"<h1>{html.escape(self.title)}</h1>" + nav
                + "\n".join(self.parts) + _TAIL)

    def save(self, path: str | Path) -> Path:
        from nexus_opt.files import write_atomic

        return write_atomic(path, self.html(), "--out")
