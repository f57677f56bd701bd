"""Small SVG plots (a histogram with a threshold line, a line plot): inline in the web pages, or as a file. No JS, no
assets, no style element: colours are presentation attributes, which the pages' CSP (style-src 'self') allows."""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

W, H = 560, 250
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 14, 44
BAD, ACCENT, BAR = "#b42318", "#0b5cad", "#4c8ed9"
# each drawn element's class and presentation attributes (key: class, or class/element where they differ)
_LOOK = {
    "axis": 'stroke="#444"',
    "tick": 'stroke="#444"',
    "tick/text": 'fill="#444" font-size="11"',
    "gridline": 'stroke="#eee"',
    "label": 'fill="#333" font-size="12"',
    "bar": f'fill="{BAR}"',
    "threshold": f'stroke="{BAD}" stroke-dasharray="5 3" stroke-width="2"',
    "threshold/text": f'fill="{BAD}" font-size="12"',
    "series": f'fill="none" stroke="{ACCENT}" stroke-width="2"',
    "point": f'fill="{ACCENT}"',
}


def _look(key: str) -> str:
    """``class="NAME"`` plus the element's presentation attributes."""
    return f'class="{key.split("/")[0]}" {_LOOK[key]}'


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


class _Frame:
    """Data -> pixel mapping plus axes, ticks and labels."""

    def __init__(self, x: tuple[float, float], y: tuple[float, float], width: int, height: int) -> None:
        self.x0, self.x1 = x if x[1] > x[0] else (x[0] - 0.5, x[0] + 0.5)
        self.y0, self.y1 = y if y[1] > y[0] else (y[0], y[0] + 1)
        self.w, self.h = width, height

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (self.w - LEFT - RIGHT)

    def py(self, y: float) -> float:
        return self.h - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (self.h - TOP - BOTTOM)

    def axes(self, xlabel: str, ylabel: str) -> list[str]:
        b, l_, r = self.h - BOTTOM, LEFT, self.w - RIGHT
        out = [f'<line {_look("axis")} x1="{l_}" y1="{b}" x2="{r}" y2="{b}"/>',
               f'<line {_look("axis")} x1="{l_}" y1="{TOP}" x2="{l_}" y2="{b}"/>']
        for t in _ticks(self.x0, self.x1):
            x = self.px(t)
            out.append(f'<line {_look("tick")} x1="{x:.1f}" y1="{b}" x2="{x:.1f}" y2="{b + 4}"/>'
                       f'<text {_look("tick/text")} x="{x:.1f}" y="{b + 16}" text-anchor="middle">{_fmt(t)}</text>')
        for t in _ticks(self.y0, self.y1, 4):
            y = self.py(t)
            out.append(f'<line {_look("gridline")} x1="{l_}" y1="{y:.1f}" x2="{r}" y2="{y:.1f}"/>'
                       f'<text {_look("tick/text")} x="{l_ - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        out.append(f'<text {_look("label")} x="{(l_ + r) / 2:.0f}" y="{self.h - 8}" text-anchor="middle">'
                   f'{html.escape(xlabel)}</text>')
        out.append(f'<text {_look("label")} transform="translate(14 {(TOP + b) / 2:.0f}) rotate(-90)" '
                   f'text-anchor="middle">{html.escape(ylabel)}</text>')
        return out


def _svg(body: list[str], title: str, width: int, height: int, css_class: str) -> str:
    t = html.escape(title)
    return (f'<svg class="{css_class}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" font-family="sans-serif" role="img" aria-label="{t}"><title>{t}</title>'
            f'<rect width="{width}" height="{height}" fill="#fff"/>' + "".join(body) + "</svg>")


def histogram_svg(values: Sequence[float] | np.ndarray, *, threshold: float | None = None, bins: int = 40,
                  xlabel: str = "value", ylabel: str = "count", title: str = "histogram",
                  width: int = W, height: int = H) -> str:
    """Bars (one <rect class="bar"> per non-empty bin) and, when given, a dashed threshold line with its value."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    lo = float(min(v.min(), threshold if threshold is not None else v.min())) if len(v) else 0.0
    hi = float(max(v.max(), threshold if threshold is not None else v.max())) if len(v) else 1.0
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    f = _Frame((lo, hi), (0.0, float(max(1, counts.max(initial=0)))), width, height)
    body = f.axes(xlabel, ylabel)
    for c, a, b in zip(counts.tolist(), edges[:-1], edges[1:], strict=True):
        if c:
            x, y = f.px(a), f.py(c)
            body.append(f'<rect {_look("bar")} x="{x:.1f}" y="{y:.1f}" width="{max(1.0, f.px(b) - x - 1):.1f}" '
                        f'height="{f.py(0) - y:.1f}"><title>{_fmt(a)} to {_fmt(b)}: {c}</title></rect>')
    if threshold is not None and math.isfinite(threshold):
        x = f.px(threshold)
        body.append(f'<line {_look("threshold")} x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{f.py(0):.1f}"/>'
                    f'<text {_look("threshold/text")} x="{x - 4:.1f}" y="{TOP + 12}" text-anchor="end">'
                    f'threshold {threshold:.3f}</text>')
    return _svg(body, title, width, height, "plot histogram")


def line_svg(points: Sequence[tuple[float, float]], *, xlabel: str = "x", ylabel: str = "y", title: str = "line plot",
             width: int = W, height: int = H) -> str:
    """One polyline (class "series") through ``points`` with a dot on each; an empty plot says "no data"."""
    pts = [(float(x), float(y)) for x, y in points if math.isfinite(float(x)) and math.isfinite(float(y))]
    if not pts:
        f = _Frame((0.0, 1.0), (0.0, 1.0), width, height)
        return _svg([*f.axes(xlabel, ylabel), f'<text {_look("label")} x="{width / 2:.0f}" y="{height / 2:.0f}" '
                     'text-anchor="middle">no data</text>'], title, width, height, "plot line")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    pad = (max(ys) - min(ys)) * 0.05
    f = _Frame((min(xs), max(xs)), (min(0.0, min(ys)) if min(ys) >= 0 else min(ys) - pad, max(ys) + pad),
               width, height)
    coords = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in pts)
    body = [*f.axes(xlabel, ylabel), f'<polyline {_look("series")} points="{coords}"/>']
    body += [f'<circle {_look("point")} cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="2.5"><title>{_fmt(x)}: {_fmt(y)}'
             '</title></circle>' for x, y in pts]
    return _svg(body, title, width, height, "plot line")


def write_svg(svg: str, path: Path) -> None:
    """An SVG plot as a standalone file (with its XML declaration), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text('<?xml version="1.0" encoding="utf-8"?>\n' + svg + "\n", encoding="utf-8")
    os.replace(tmp, path)


def similarity_histogram_svg(similarity: np.ndarray, threshold: float) -> str:
    """The filter's histogram of each synthetic image's similarity to its closest real training image, with the
    threshold when it is finite (a filter without a plain best-match re-id detector has none on this scale)."""
    return histogram_svg(similarity, threshold=threshold if math.isfinite(threshold) else None,
                         xlabel="cosine similarity to the closest real training image", ylabel="synthetic images",
                         title="Re-identification similarity of the synthetic images, with the filter threshold")


def write_similarity_histogram(similarity: np.ndarray, threshold: float, path: Path) -> None:
    """similarity_histogram_svg as a standalone file."""
    write_svg(similarity_histogram_svg(similarity, threshold), path)
