"""A self-contained HTML report of generations and their per-token persona scores.

The report is drawn from the JSON objects that `safety-lens generate` prints
(`trajectory.trajectory_document`), so a saved JSON file contains everything
it shows. It uses inline CSS and inline SVG only: no scripts, fonts, images or
styles from elsewhere, so it opens offline and can be attached to a ticket.
Every text from the model, the prompt or the metadata goes through
`html.escape`.

Colours are anchored on the calibrated score: 0 (the mean of the vector's
negative stimuli) is blue, 0.5 is white, 1 (the mean of its positive
stimuli) is red, and scores beyond either end keep the end colour.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safety_lens_cli.errors import UsageError

# (score, RGB) stops of the colour scale.
COLOR_STOPS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.0, (103, 169, 207)),
    (0.5, (247, 247, 247)),
    (1.0, (239, 138, 98)),
)
FLAG_COLOR = "#b2182b"
CHART_WIDTH = 760
CHART_HEIGHT = 200
CHART_MARGIN = {"left": 48, "right": 112, "top": 12, "bottom": 34}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #fafafa; color: #1b1b1b; }
main { max-width: 980px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.5rem; margin: 0 0 4px; }
h2 { font-size: 1.25rem; margin: 32px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1.05rem; margin: 20px 0 8px; }
h4 { font-size: 0.95rem; margin: 16px 0 6px; font-weight: 600; }
.muted { color: #666; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.85em; }
table { border-collapse: collapse; margin: 4px 0 8px; font-size: 0.9rem; }
th, td { text-align: left; padding: 3px 10px 3px 0; vertical-align: top; }
th { color: #555; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.message { margin: 6px 0; padding: 8px 10px; background: #fff; border: 1px solid #e3e3e3; border-radius: 4px; }
.role { display: block; font-size: 0.75rem; text-transform: uppercase; letter-spacing: 0.05em; color: #666; }
.content { white-space: pre-wrap; margin: 0; }
.heatmap { white-space: pre-wrap; line-height: 1.9; padding: 10px; background: #fff; border: 1px solid #e3e3e3;
  border-radius: 4px; font-size: 0.95rem; overflow-wrap: anywhere; }
.tok { border-radius: 2px; padding: 1px 0; }
.tok.flag { box-shadow: inset 0 -3px 0 %(flag)s; }
.tok.special { font-style: italic; color: #444; outline: 1px dotted #999; }
.tok.empty { display: inline-block; min-width: 0.35em; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 0.8rem; color: #555; margin: 6px 0 0; }
.legend .bar { width: 220px; height: 12px; border: 1px solid #ccc;
  background: linear-gradient(to right, %(c0)s, %(c5)s, %(c1)s); }
.flag-key { box-shadow: inset 0 -3px 0 %(flag)s; padding: 0 4px; background: #fff; }
svg.chart { display: block; width: 100%%; height: auto; background: #fff; border: 1px solid #e3e3e3;
  border-radius: 4px; margin-top: 8px; }
details { margin: 6px 0; font-size: 0.9rem; color: #555; }
pre.rendered { padding: 8px 10px; background: #fff; border: 1px solid #e3e3e3; border-radius: 4px; }
.flagged { color: %(flag)s; font-weight: 600; }
"""


def score_rgb(score: float) -> tuple[int, int, int]:
    """Colour of a calibrated score, anchored at 0 and 1; NaN is grey."""
    if not math.isfinite(score):
        return (200, 200, 200)
    value = min(max(score, COLOR_STOPS[0][0]), COLOR_STOPS[-1][0])
    for (low, low_rgb), (high, high_rgb) in zip(COLOR_STOPS, COLOR_STOPS[1:]):
        if value <= high:
            t = (value - low) / (high - low)
            red, green, blue = (round(a + (b - a) * t) for a, b in zip(low_rgb, high_rgb))
            return (red, green, blue)
    return COLOR_STOPS[-1][1]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "n/a"


def _score_of(token: Mapping[str, Any], key: str) -> tuple[float, float]:
    """(raw, score) of one token on one column; NaN where the JSON has null."""
    entry = token.get("scores", {}).get(key) or {}
    raw, score = entry.get("raw"), entry.get("score")
    return (
        float(raw) if isinstance(raw, (int, float)) else math.nan,
        float(score) if isinstance(score, (int, float)) else math.nan,
    )


def _visible_text(text: str) -> str:
    """Token text as shown in the heatmap: a newline gets a visible mark before the line break."""
    return text.replace("\n", "\u21b5\n")


def _heatmap(tokens: Sequence[Mapping[str, Any]], key: str, threshold: float) -> str:
    spans: list[str] = []
    for index, token in enumerate(tokens):
        raw, score = _score_of(token, key)
        text = str(token.get("token", ""))
        classes = ["tok"]
        if math.isfinite(score) and score >= threshold:
            classes.append("flag")
        if token.get("special"):
            classes.append("special")
        if not text:
            classes.append("empty")
        title = (
            f"token {index + 1}: {text!r} (id {token.get('id')})\n"
            f"raw {_number(raw)}\nscore {_number(score)}" + ("\nflagged" if "flag" in classes else "")
        )
        spans.append(
            f'<span class="{" ".join(classes)}" style="background:{_hex(score_rgb(score))}" '
            f'title="{_esc(title)}" data-score="{_number(score, 4)}">{_esc(_visible_text(text))}</span>'
        )
    return f'<div class="heatmap" data-persona="{_esc(key)}">{"".join(spans)}</div>'


def _ticks(count: int) -> list[int]:
    """0-based token indices to label on the x axis, about ten of them."""
    if count <= 1:
        return [0] if count else []
    step = max(1, math.ceil(count / 10))
    ticks = list(range(0, count, step))
    if ticks[-1] != count - 1 and count - 1 - ticks[-1] >= step / 2:
        ticks.append(count - 1)
    return ticks


def _value_ticks(low: float, high: float) -> list[float]:
    """Round values between `low` and `high` to label on the y axis, about five of them."""
    span = high - low
    step = 10 ** math.floor(math.log10(span / 5)) if span > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if span / (step * factor) <= 6:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step) + 1)]


def line_chart(scores: Sequence[float], threshold: float, key: str, labels: Sequence[str] = ()) -> str:
    """Draw an inline SVG line chart of scores over generated tokens, with lines at 0, 1 and the threshold."""
    left, right, top, bottom = (CHART_MARGIN[k] for k in ("left", "right", "top", "bottom"))
    plot_w = CHART_WIDTH - left - right
    plot_h = CHART_HEIGHT - top - bottom
    finite = [s for s in scores if math.isfinite(s)]
    low = min([0.0, threshold, *finite])
    high = max([1.0, threshold, *finite])
    pad = (high - low) * 0.06
    low, high = low - pad, high + pad
    count = len(scores)

    def x_at(index: int) -> float:
        return left + (plot_w / 2 if count <= 1 else plot_w * index / (count - 1))

    def y_at(value: float) -> float:
        return top + plot_h * (high - value) / (high - low)

    parts = [
        f'<svg class="chart" data-persona="{_esc(key)}" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" '
        f'width="{CHART_WIDTH}" height="{CHART_HEIGHT}" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'aria-label="{_esc(f"{key} score per generated token")}">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fcfcfc" stroke="#ddd"/>',
    ]
    references = ((0.0, "0 (negative mean)", "#888"), (1.0, "1 (positive mean)", "#888"))
    for value, label, colour in references:
        y = y_at(value)
        parts.append(
            f'<line class="ref" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{colour}" '
            f'stroke-dasharray="4 3"/><text x="{left + plot_w + 4}" y="{y + 4:.1f}" font-size="10" '
            f'fill="#666">{_esc(label)}</text>'
        )
    y = y_at(threshold)
    parts.append(
        f'<line class="threshold" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{FLAG_COLOR}" '
        f'stroke-dasharray="2 2"/><text x="{left + plot_w + 4}" y="{y + 4:.1f}" font-size="10" '
        f'fill="{FLAG_COLOR}">threshold {_esc(_number(threshold, 2))}</text>'
    )
    for value in _value_ticks(low, high):
        y = y_at(value)
        parts.append(
            f'<line x1="{left - 4}" x2="{left}" y1="{y:.1f}" y2="{y:.1f}" stroke="#999"/>'
            f'<text x="{left - 6}" y="{y + 3.5:.1f}" font-size="10" fill="#666" text-anchor="end">{value:g}</text>'
        )
    for index in _ticks(count):
        x = x_at(index)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="#999"/>'
            f'<text x="{x:.1f}" y="{top + plot_h + 15}" font-size="10" fill="#666" '
            f'text-anchor="middle">{index + 1}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{CHART_HEIGHT - 4}" font-size="11" fill="#555" '
        'text-anchor="middle">generated token</text>'
        f'<text x="11" y="{top + plot_h / 2:.1f}" font-size="11" fill="#555" text-anchor="middle" '
        f'transform="rotate(-90 11 {top + plot_h / 2:.1f})">score</text>'
    )

    # A null score breaks the line, so each finite run is its own polyline.
    runs: list[list[str]] = [[]]
    for index, score in enumerate(scores):
        if math.isfinite(score):
            runs[-1].append(f"{x_at(index):.1f},{y_at(score):.1f}")
        elif runs[-1]:
            runs.append([])
    for run in runs:
        if len(run) > 1:
            points = " ".join(run)
            parts.append(f'<polyline class="series" fill="none" stroke="#333" stroke-width="1.5" points="{points}"/>')
    for index, score in enumerate(scores):
        if not math.isfinite(score):
            continue
        flagged = score >= threshold
        label = labels[index] if index < len(labels) else ""
        tooltip = _esc(f"token {index + 1}: {label!r} score {score:.3f}")
        parts.append(
            f'<circle class="point" cx="{x_at(index):.1f}" cy="{y_at(score):.1f}" r="{3 if flagged else 2.2}" '
            f'fill="{FLAG_COLOR if flagged else "#333"}"><title>{tooltip}</title></circle>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _legend(threshold: float) -> str:
    return (
        '<div class="legend"><span>score 0</span><span class="bar"></span><span>1</span>'
        f'<span class="flag-key">underlined</span><span>score &ge; threshold {_esc(_number(threshold, 2))}</span></div>'
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    def cell(tag: str, index: int, text: str) -> str:
        css_class = ' class="num"' if index in numeric else ""
        return f"<{tag}{css_class}>{_esc(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body_rows = ["<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body_rows)}</tbody></table>"


def _architecture(model: Mapping[str, Any]) -> str:
    text = str(model.get("architecture") or "unknown")
    if model.get("dtype") and model.get("device"):
        text += f", {model['dtype']} on {model['device']}"
    return text


def _run_details(document: Mapping[str, Any]) -> str:
    model = document.get("model") or {}
    sampling = document.get("sampling") or {}
    rows = [
        ("model", str(model.get("model_id", "unknown"))),
        ("fingerprint", str(model.get("fingerprint", "unknown"))),
        ("architecture", _architecture(model)),
        (
            "decoding",
            "greedy" if not sampling.get("temperature") else
            f"temperature {sampling.get('temperature')}, top-p {sampling.get('top_p')}, seed {sampling.get('seed')}",
        ),
        ("max new tokens", str(sampling.get("max_new_tokens", "?"))),
        ("stop reason", str(document.get("stop_reason", "?"))),
    ]
    detail_rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    details = f"<table><tbody>{detail_rows}</tbody></table>"
    vectors = [
        (
            str(v.get("key", v.get("persona"))),
            str(v.get("persona")),
            str(v.get("layer")),
            str(v.get("object_id") or "none"),
        )
        for v in document.get("vectors", [])
    ]
    steering = [
        (
            str(s.get("persona")),
            _number(s.get("coefficient"), 2),
            str(s.get("layer")),
            _number(s.get("scale"), 2),
            str(s.get("positions")),
            str(s.get("object_id") or "none"),
        )
        for s in document.get("steering", [])
    ]
    parts = [details, "<h4>Vectors</h4>", _table(("score", "persona", "layer", "vector id"), vectors)]
    parts.append("<h4>Steering</h4>")
    if steering:
        headers = ("persona", "coefficient", "layer", "added norm", "positions", "vector id")
        parts.append(_table(headers, steering, numeric=(1, 3)))
    else:
        parts.append('<p class="muted">none</p>')
    return "".join(parts)


def _prompt(document: Mapping[str, Any]) -> str:
    prompt = document.get("prompt") or {}
    messages = prompt.get("messages") or []
    parts = [
        f'<div class="message"><span class="role">{_esc(m.get("role", ""))}</span>'
        f'<p class="content">{_esc(m.get("content", ""))}</p></div>'
        for m in messages
    ]
    tokens = _esc(prompt.get("tokens", "?"))
    rendered = prompt.get("text")
    if isinstance(rendered, str):
        parts.append(
            f"<details><summary>{tokens} prompt tokens as the model reads them</summary>"
            f'<pre class="content mono rendered">{_esc(rendered)}</pre></details>'
        )
    else:
        parts.append(f'<p class="muted">{tokens} prompt tokens</p>')
    return "".join(parts)


def _prompt_scan(document: Mapping[str, Any], threshold: float) -> str:
    rows = []
    for key, entry in (document.get("prompt_scan") or {}).items():
        score = entry.get("score")
        flagged = isinstance(score, (int, float)) and score >= threshold
        label = "flagged" if flagged else ""
        rows.append((str(key), str(entry.get("layer")), _number(entry.get("raw")), _number(score), label))
    return _table(("persona", "layer", "raw", "score", ""), rows, numeric=(2, 3))


def _persona_section(document: Mapping[str, Any], key: str, threshold: float) -> str:
    tokens = document.get("tokens") or []
    scores = [_score_of(t, key)[1] for t in tokens]
    finite = [s for s in scores if math.isfinite(s)]
    flagged = sum(1 for s in finite if s >= threshold)
    summary = (
        f"mean {_number(sum(finite) / len(finite)) if finite else 'n/a'}, "
        f"max {_number(max(finite)) if finite else 'n/a'}, "
        f"{flagged} of {len(tokens)} tokens at or above the threshold"
    )
    labels = [str(t.get("token", "")) for t in tokens]
    return (
        f'<section class="persona" data-persona="{_esc(key)}"><h4>{_esc(key)} '
        f'<span class="muted">{_esc(summary)}</span></h4>'
        f"{_heatmap(tokens, key, threshold)}{_legend(threshold)}{line_chart(scores, threshold, key, labels)}</section>"
    )


def _generation_section(document: Mapping[str, Any], number: int) -> str:
    threshold = float(document.get("threshold", 0.5))
    keys = [str(v.get("key", v.get("persona"))) for v in document.get("vectors", [])]
    title = f"Generation {number}" + (f" (id {document['id']})" if "id" in document else "")
    personas = "".join(_persona_section(document, key, threshold) for key in keys)
    return (
        f'<section class="generation" id="generation-{number}"><h2>{_esc(title)}</h2>'
        f"<h3>Prompt</h3>{_prompt(document)}"
        f"<h3>Prompt scan</h3><p class=\"muted\">Scores at the last prompt token, as a scan reads a prompt.</p>"
        f"{_prompt_scan(document, threshold)}"
        f"<h3>Generated text</h3><p class=\"muted\">Each token is scored at the position where it is fed back "
        f"as input. Hover a token for its raw projection and calibrated score.</p>{personas}"
        f"<h3>Run</h3>{_run_details(document)}</section>"
    )


def render_report(documents: Sequence[Mapping[str, Any]], title: str = "safety-lens generation report") -> str:
    """Render the whole HTML page for one or more generation JSON objects."""
    if not documents:
        raise UsageError("No generations to put in the report.")
    model = documents[0].get("model") or {}
    css = _CSS % {
        "flag": FLAG_COLOR,
        "c0": _hex(COLOR_STOPS[0][1]),
        "c5": _hex(COLOR_STOPS[1][1]),
        "c1": _hex(COLOR_STOPS[2][1]),
    }
    sections = "".join(_generation_section(d, i) for i, d in enumerate(documents, start=1))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{css}</style></head><body><main>"
        f"<h1>{_esc(title)}</h1>"
        f'<p class="muted">{_esc(model.get("model_id", "unknown model"))} &middot; '
        f'<span class="mono">{_esc(model.get("fingerprint", ""))}</span> &middot; '
        f"{len(documents)} generation{'s' if len(documents) != 1 else ''}</p>"
        f"{sections}</main></body></html>\n"
    )


def write_report(path: Path, documents: Sequence[Mapping[str, Any]]) -> None:
    """Write the report to `path` through a temp file in the same folder and `os.replace`."""
    page = render_report(documents)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"Report folder '{folder}' does not exist: create it or choose another --report path.")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-report-", suffix=".html")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
