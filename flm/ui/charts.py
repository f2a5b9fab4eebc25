"""Server-rendered SVG charts: bars and lines with a hover title per point.

Colours come from CSS classes (``series-0``...) so both themes restyle them; every value is also
in a table next to the chart for screen readers. No script and no inline style is emitted (the
UI's Content-Security-Policy allows neither).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 340, 150
LEFT, BOTTOM, TOP, RIGHT = 36, 18, 8, 6


@dataclass
class Series:
    name: str
    values: Sequence[float | None]


def _scale(series: Sequence[Series], stacked: bool) -> float:
    if stacked:
        top = max(
            (sum(s.values[i] or 0 for s in series) for i in range(len(series[0].values))), default=0
        )
    else:
        top = max((v for s in series for v in s.values if v is not None), default=0)
    top = float(top or 1)
    magnitude = 10 ** max(0, len(str(int(top))) - 1)
    return float(-(-top // magnitude) * magnitude)


def _frame(title: str, labels: Sequence[str], top: float, unit: str, kind: str) -> list[str]:
    plot_h = HEIGHT - TOP - BOTTOM
    out = [
        f'<svg class="chart" data-chart="{escape(kind)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for frac in (0.0, 0.5, 1.0):
        y = TOP + plot_h * (1 - frac)
        value = top * frac
        text = f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}"
        out.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        out.append(
            f'<text class="axis" x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(text)}</text>"
        )
    if labels:
        step = (WIDTH - LEFT - RIGHT) / len(labels)
        for i in range(0, len(labels), max(1, len(labels) // 4)):
            out.append(
                f'<text class="axis" x="{LEFT + i * step:.1f}" y="{HEIGHT - 4}">'
                f"{escape(labels[i])}</text>"
            )
    return out


def bars(
    title: str, labels: Sequence[str], series: Sequence[Series], unit: str = "", kind: str = "bars"
) -> Markup:
    """Stacked bars, one per label."""
    top = _scale(series, stacked=True)
    plot_h = HEIGHT - TOP - BOTTOM
    step = (WIDTH - LEFT - RIGHT) / max(1, len(labels))
    out = _frame(title, labels, top, unit, kind)
    for i, label in enumerate(labels):
        base = 0.0
        for n, s in enumerate(series):
            value = s.values[i] or 0
            if not value:
                continue
            h = plot_h * value / top
            y = TOP + plot_h - plot_h * (base + value) / top
            out.append(
                f'<rect class="series-{n}" data-value="{value:g}" '
                f'x="{LEFT + i * step + 1:.1f}" y="{y:.1f}" '
                f'width="{max(1.0, step - 2):.1f}" height="{h:.1f}">'
                f"<title>{escape(label)} {escape(s.name)}: {value:g}{escape(unit)}"
                "</title></rect>"
            )
            base += value
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - every interpolated value is escaped above


def lines(
    title: str, labels: Sequence[str], series: Sequence[Series], unit: str = "", kind: str = "lines"
) -> Markup:
    """One polyline per series; gaps where a value is missing; a dot with a title per point."""
    top = _scale(series, stacked=False)
    plot_h = HEIGHT - TOP - BOTTOM
    step = (WIDTH - LEFT - RIGHT) / max(1, len(labels))
    out = _frame(title, labels, top, unit, kind)
    for n, s in enumerate(series):
        points: list[str] = []
        segments: list[list[str]] = []
        for i, value in enumerate(s.values):
            if value is None:
                if points:
                    segments.append(points)
                points = []
                continue
            x = LEFT + i * step + step / 2
            y = TOP + plot_h - plot_h * value / top
            points.append(f"{x:.1f},{y:.1f}")
            out.append(
                f'<circle class="series-{n}" data-value="{value:g}" cx="{x:.1f}" '
                f'cy="{y:.1f}" r="2.5"><title>{escape(labels[i])} {escape(s.name)}: '
                f"{value:.1f}{escape(unit)}</title></circle>"
            )
        if points:
            segments.append(points)
        for seg in segments:
            out.append(f'<polyline class="line series-{n}" points="{" ".join(seg)}"/>')
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - every interpolated value is escaped above


def hbars(
    title: str,
    rows: Sequence[tuple[str, float]],
    kind: str = "hbars",
    empty: str = "",
    links: Sequence[str] = (),
) -> Markup:
    """Horizontal bars, one per (label, value), largest first as given; ``empty`` is written
    in the chart when there is no row; ``links[i]``, when given, is where row i leads."""
    row_h, label_w = 18, 130
    height = max(1, len(rows)) * row_h + 4
    top = max((v for _, v in rows), default=0) or 1
    out = [
        f'<svg class="chart" data-chart="{escape(kind)}" viewBox="0 0 {WIDTH} {height}" '
        f'role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    if not rows and empty:
        out.append(f'<text class="axis" x="6" y="14">{escape(empty)}</text>')
    for i, (label, value) in enumerate(rows):
        y = 2 + i * row_h
        w = (WIDTH - label_w - 40) * value / top
        short = label if len(label) <= 20 else label[:19] + "…"
        if i < len(links):
            out.append(f'<a href="{escape(links[i])}" data-link="{escape(label)}">')
        out.append(
            f'<text class="axis" x="{label_w - 4}" y="{y + 12}" text-anchor="end">'
            f"{escape(short)}</text>"
        )
        out.append(
            f'<rect class="series-0" data-value="{value:g}" x="{label_w}" y="{y + 2}" '
            f'width="{max(1.0, w):.1f}" height="{row_h - 5}"><title>{escape(label)}: '
            f"{value:g}</title></rect>"
        )
        out.append(f'<text class="axis" x="{label_w + w + 4:.1f}" y="{y + 12}">{value:g}</text>')
        if i < len(links):
            out.append("</a>")
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - every interpolated value is escaped above


def sparkline(samples: Sequence[tuple[str, str, float | None]], title: str) -> Markup:
    """An engine's recent health: one mark per detection (time, status, latency); the mark's
    shape and class tell the status (a filled dot healthy, a ring degraded, a cross down)."""
    w, h = 120, 24
    out = [
        f'<svg class="spark" data-chart="health" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    if samples:
        top = max((s[2] or 0 for s in samples), default=0) or 1
        step = w / max(1, len(samples))
        for i, (when, status, latency) in enumerate(samples):
            x = step * i + step / 2
            y = h - 4 - (h - 8) * (latency or 0) / top
            tip = f"<title>{escape(when)} {escape(status)} {latency or 0:.0f} ms</title>"
            if status == "RunningHealthy":
                out.append(f'<circle class="ok" cx="{x:.1f}" cy="{y:.1f}" r="2.5">{tip}</circle>')
            elif status == "RunningDegraded":
                out.append(f'<circle class="warn" cx="{x:.1f}" cy="{y:.1f}" r="3">{tip}</circle>')
            else:
                out.append(
                    f'<path class="bad" d="M{x - 3:.1f} {h - 7} l6 6 m0 -6 l-6 6">{tip}</path>'
                )
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - every interpolated value is escaped above
