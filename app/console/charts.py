"""Server-side SVG charts: no script, no CDN, drawn in the page's HTML. Each chart is an
``<svg role="img">`` with a title and a description for screen readers; the pages put the same
numbers in a table beside it. Sizes are in viewBox units, so a chart scales to a narrow window."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

# Colours chosen for contrast on white (WCAG AA for text, 3:1 for shapes).
BLUE = "#1f5fbf"
GREEN = "#1a7f37"
RED = "#b42318"
AMBER = "#9a6700"
GREY = "#57606a"
STATUS_COLOURS = {
    "success": GREEN,
    "failed": RED,
    "cancelled": GREY,
    "running": "#6639ba",
    "queued": AMBER,
}

_W, _H = 640, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 84, 16, 16, 36


def _svg(title: str, desc: str, body: str, width: int = _W, height: int = _H) -> Markup:
    ident = "c" + secrets.token_hex(4)
    return Markup(
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="{ident}t {ident}d" preserveAspectRatio="xMidYMid meet">'
        f'<title id="{ident}t">{escape(title)}</title><desc id="{ident}d">{escape(desc)}</desc>'
        f"{body}</svg>"
    )


def _text(x: float, y: float, label: str, anchor: str = "middle", cls: str = "tick") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" class="{cls}">{escape(label)}</text>'
    )


def _nice_max(value: float, whole: bool = False) -> float:
    """The top of an axis: 1, 2, 2.5 or 5 times a power of ten, at or above ``value``; with
    ``whole``, an even whole number (its half is a gridline)."""
    if value <= 0:
        return 2.0 if whole else 1.0
    if whole and value <= 10:
        return float(max(2, math.ceil(value / 2) * 2))
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        top = step * magnitude
        if top >= value * (1 - 1e-9) and (not whole or (top >= 2 and top % 2 == 0)):
            return top
    return 10 * magnitude


def usd(value: float) -> str:
    """An axis label in dollars, with no more places than it needs (up to six)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return f"${text}"


def whole(value: float) -> str:
    return f"{value:.0f}"


def _y_axis(top: float, fmt: Callable[[float], str]) -> str:
    """Gridlines at 0, 1/2 and the top of the scale, labelled."""
    out = []
    plot_h = _H - _TOP - _BOTTOM
    for frac in (0.0, 0.5, 1.0):
        y = _TOP + plot_h * (1 - frac)
        out.append(
            f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
        )
        out.append(_text(_LEFT - 6, y + 4, fmt(top * frac), "end"))
    return "".join(out)


@dataclass(frozen=True)
class Series:
    name: str
    colour: str
    values: Sequence[float]


def bar_chart(
    title: str,
    desc: str,
    labels: Sequence[str],
    series: Sequence[Series],
    fmt: Callable[[float], str] = whole,
    label_every: int = 5,
) -> Markup:
    """Vertical bars, one per label, the series stacked in order."""
    n = max(1, len(labels))
    totals = [sum(s.values[i] for s in series) for i in range(len(labels))]
    top = _nice_max(max(totals, default=0), whole=fmt is whole)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    slot = plot_w / n
    bar_w = max(1.0, slot * 0.7)
    parts = [_y_axis(top, fmt)]
    for i, label in enumerate(labels):
        x = _LEFT + i * slot + (slot - bar_w) / 2
        base = float(_TOP + plot_h)
        for s in series:
            v = s.values[i]
            if v <= 0:
                continue
            h = plot_h * v / top
            base -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{s.colour}"><title>{escape(label)}: {escape(s.name)} '
                f"{escape(fmt(v))}</title></rect>"
            )
        if i % label_every == 0 or i == n - 1:
            parts.append(_text(x + bar_w / 2, _H - _BOTTOM + 16, label))
    if len(series) > 1:
        x = _LEFT
        for s in series:
            parts.append(
                f'<rect x="{x}" y="{_H - 12}" width="10" height="10" fill="{s.colour}"/>'
                + _text(x + 14, _H - 3, s.name, "start", "legend")
            )
            x += 24 + 8 * len(s.name)
    return _svg(title, desc, "".join(parts))


def hbar_chart(title: str, desc: str, rows: Sequence[tuple[str, float, str]]) -> Markup:
    """Horizontal bars: (label, value, value's text) per row, largest first."""
    row_h = 26
    height = max(1, len(rows)) * row_h + 8
    width, label_w, value_w = 480, 120, 100
    plot_w = width - label_w - value_w
    top = max((v for _, v, _ in rows), default=0) or 1
    parts = []
    for i, (label, value, shown) in enumerate(rows):
        y = 4 + i * row_h
        w = max(1.0, plot_w * value / top) if value > 0 else 0
        parts.append(_text(label_w - 8, y + 17, label, "end", "label"))
        parts.append(
            f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" fill="{BLUE}"/>'
        )
        parts.append(_text(label_w + w + 6, y + 17, shown, "start", "label"))
    if not rows:
        parts.append(_text(width / 2, 20, "nothing yet", "middle", "label"))
    return _svg(title, desc, "".join(parts), width, height)


@dataclass(frozen=True)
class Point:
    label: str
    x: float | None  # estimated latency, ms (None: unknown)
    y: float  # estimated charge, USD
    live: bool
    note: str
    chosen: bool = False
    dropped: bool = False


def scatter_chart(
    title: str, desc: str, points: Sequence[Point], x_unit: str, y_fmt: Callable[[float], str] = usd
) -> Markup:
    """Quotes on one chart: latency across, charge up. Filled: live; hollow: not live; a ring:
    the provider that served; a cross: dropped. A quote of unknown latency sits at the right
    edge, marked '?'."""
    known = [p.x for p in points if p.x is not None]
    x_top = _nice_max(max(known, default=0) * 1.1)
    y_top = _nice_max(max((p.y for p in points), default=0) * 1.1)
    plot_w, plot_h = _W - _LEFT - _RIGHT - 40, _H - _TOP - _BOTTOM
    parts = [_y_axis(y_top, y_fmt)]
    for frac in (0.0, 0.5, 1.0):
        x = _LEFT + plot_w * frac
        parts.append(_text(x, _H - _BOTTOM + 16, f"{x_top * frac:g} {x_unit}"))
    if len(known) < len(points):
        parts.append(_text(_LEFT + plot_w + 24, _H - _BOTTOM + 16, "?"))
    for p in points:
        x = _LEFT + plot_w + 24 if p.x is None else _LEFT + plot_w * p.x / x_top
        y = _TOP + plot_h * (1 - p.y / y_top)
        colour = GREY if p.dropped else (GREEN if p.live else RED)
        fill = colour if p.live else "white"
        tip = f"<title>{escape(p.label)}: {escape(p.note)}</title>"
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="7" fill="{fill}" stroke="{colour}" '
            f'stroke-width="2.5">{tip}</circle>'
        )
        if p.chosen:
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="12" fill="none" stroke="{BLUE}" '
                'stroke-width="2.5"/>'
            )
        if p.dropped:
            parts.append(
                f'<path d="M{x - 6:.1f},{y - 6:.1f}L{x + 6:.1f},{y + 6:.1f}M{x + 6:.1f},'
                f'{y - 6:.1f}L{x - 6:.1f},{y + 6:.1f}" stroke="{RED}" stroke-width="2"/>'
            )
        # Labels right of their point, or left of it near the right edge (never clipped).
        if x > _LEFT + plot_w * 0.7:
            parts.append(_text(x - 14, y - 10, p.label, "end", "label"))
        else:
            parts.append(_text(x + 14, y - 10, p.label, "start", "label"))
    return _svg(title, desc, "".join(parts))


@dataclass(frozen=True)
class Span:
    label: str
    duration_ms: int | None
    ok: bool
    note: str


def timeline_chart(title: str, desc: str, spans: Sequence[Span]) -> Markup:
    """The attempts one after another, each as long as it took."""
    row_h = 30
    height = max(1, len(spans)) * row_h + 30
    label_w = 110
    plot_w = _W - label_w - 150
    total = sum(s.duration_ms or 0 for s in spans) or 1
    parts = []
    start = 0
    for i, span in enumerate(spans):
        y = 4 + i * row_h
        d = span.duration_ms or 0
        x = label_w + plot_w * start / total
        w = max(2.0, plot_w * d / total)
        colour = GREEN if span.ok else RED
        parts.append(_text(label_w - 8, y + 19, f"{i + 1}. {span.label}", "end", "label"))
        parts.append(
            f'<rect x="{x:.1f}" y="{y + 5}" width="{w:.1f}" height="{row_h - 10}" '
            f'fill="{colour}"><title>{escape(span.note)}</title></rect>'
        )
        parts.append(_text(x + w + 6, y + 19, span.note, "start", "label"))
        start += d
    parts.append(
        f'<line x1="{label_w}" x2="{label_w + plot_w}" y1="{height - 22}" y2="{height - 22}" '
        'class="grid"/>'
    )
    parts.append(_text(label_w, height - 6, "0 ms", "start"))
    parts.append(_text(label_w + plot_w, height - 6, f"{total} ms", "end"))
    if not spans:
        parts.append(_text(_W / 2, 20, "no attempt", "middle", "label"))
    return _svg(title, desc, "".join(parts), _W, height)


def sparkline(title: str, values: Sequence[int | None], live: Sequence[bool]) -> Markup:
    """A small latency line; a red tick where a check found the provider down."""
    width, height = 160, 36
    if not values:
        return _svg(
            title,
            "no history yet",
            _text(width / 2, 22, "no history", "middle", "tick"),
            width,
            height,
        )
    known = [v for v in values if v is not None]
    top = max(known, default=1) or 1
    n = len(values)
    step = width / max(1, n - 1)
    points = []
    marks = []
    for i, (v, up) in enumerate(zip(values, live, strict=True)):
        x = i * step if n > 1 else width / 2
        if v is not None and up:
            points.append(f"{x:.1f},{height - 4 - (height - 8) * v / top:.1f}")
        if not up:
            marks.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="2" y2="{height - 2}" stroke="{RED}"/>'
            )
    line = (
        f'<polyline points="{" ".join(points)}" fill="none" stroke="{BLUE}" stroke-width="1.5"/>'
        if len(points) > 1
        else ""
    )
    # A single point has no line: a dot (a provider checked within the last minute only).
    dots = (
        "".join(
            f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="2.5" fill="{BLUE}"/>'
            for p in points
        )
        if len(points) == 1
        else ""
    )
    down = sum(1 for up in live if not up)
    desc = (
        f"{n} points; latency {min(known)} to {max(known)} ms; down in {down}"
        if known
        else f"{n} points, none answered"
    )
    return _svg(title, desc, line + dots + "".join(marks), width, height)
