"""`pomvid runs compare --html FILE`: one self-contained page (table and plots) to open in a browser.

The plots are embedded as base64 PNG data URIs and the style is inline, so the file can be mailed,
attached to a ticket or archived without its folder. Every cell is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.section td { background: #f3f3f3; font-weight: 600; text-align: left; }
figure { display: inline-block; margin: 1em 1em 0 0; }
figcaption { font-size: 0.85em; color: #555; }
code { background: #f6f6f6; padding: 0 0.2em; }
"""


def _section(label: str) -> str | None:
    if label.startswith("param "):
        return "params that differ"
    if label.startswith("eval/"):
        return "eval metrics (per protocol)"
    if label and label not in ("run_id", "status", "start", "duration"):
        return "training metrics"
    return None


def render_html(rows: Sequence[Sequence[str]], *, title: str, plots: Mapping[str, str | os.PathLike],
                notes: Sequence[str] = (), source: str = "") -> str:
    """The page: `rows` (header first) as a table with section rows, `notes` as a list, `plots` embedded."""
    e = html.escape
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
           f"<style>{_STYLE}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if source:
        out.append(f"<p>Runs from <code>{e(source)}</code>, {e(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>")
    out.append("<table id=\"comparison\">")
    out.append("<thead><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in rows[0]) + "</tr></thead><tbody>")
    current = None
    for row in rows[1:]:
        section = _section(str(row[0]))
        if section and section != current:
            out.append(f"<tr class=\"section\"><td colspan=\"{len(row)}\">{e(section)}</td></tr>")
            current = section
        out.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    if notes:
        out.append("<h2>Eval protocols</h2><ul>" + "".join(f"<li><code>{e(n)}</code></li>" for n in notes) + "</ul>")
    if plots:
        out.append("<h2>Plots</h2>")
    for name, path in plots.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        out.append(f"<figure><img alt=\"{e(name)}\" src=\"data:image/png;base64,{data}\">"
                   f"<figcaption>{e(name)}</figcaption></figure>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_html(path: str | os.PathLike, page: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
