"""Line charts as inline SVG, drawn on the server: no chart library, no script.

Every reported value is one ``<circle class="point">`` with ``data-series``, ``data-step`` and
``data-value``, so a reader (or a browser test) can count and read the drawn points.
"""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT = 560, 240
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 28, 34
COLORS = ("#1f6feb", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285")

Series = dict[str, list[tuple[int, float]]]


def line_chart(chart_id: str, title: str, series: Series, labels: dict[str, str]) -> str:
    """One chart of several series against step; empty series are left out."""
    series = {name: points for name, points in series.items() if points}
    if not series:
        return ""
    steps = [s for points in series.values() for s, _ in points]
    values = [v for points in series.values() for _, v in points]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    if y0 == y1:  # a flat line still needs a visible range
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def x(step: int) -> float:
        span = (x1 - x0) or 1
        return LEFT + (step - x0) / span * (WIDTH - LEFT - RIGHT)

    def y(value: float) -> float:
        return TOP + (y1 - value) / (y1 - y0) * (HEIGHT - TOP - BOTTOM)

    parts = [f'<svg class="chart" data-chart="{escape(chart_id)}" width="{WIDTH}" '
             f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{LEFT}" y="16" font-size="13" font-weight="600">{escape(title)}</text>']
    parts += _axes(x0, x1, y0, y1)
    for i, (name, points) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
        parts.append(f'<polyline class="line" data-series="{escape(name)}" fill="none" '
                     f'stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        for step, value in points:
            parts.append(
                f'<circle class="point" data-series="{escape(name)}" data-step="{step}" '
                f'data-value="{value:.6g}" cx="{x(step):.1f}" cy="{y(value):.1f}" r="2.5" '
                f'fill="{color}"><title>{escape(labels.get(name, name))} at step {step}: '
                f'{value:.4g}</title></circle>')
        legend_x = LEFT + 130 + i * 120
        parts.append(f'<rect x="{legend_x}" y="8" width="10" height="10" fill="{color}"/>'
                     f'<text x="{legend_x + 14}" y="17" font-size="11">'
                     f'{escape(labels.get(name, name))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _axes(x0: int, x1: int, y0: float, y1: float) -> list[str]:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    return [
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="#999"/>',
        f'<line x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#999"/>',
        f'<text x="{LEFT - 4}" y="{TOP + 4}" font-size="10" text-anchor="end">{y1:.3g}</text>',
        f'<text x="{LEFT - 4}" y="{bottom}" font-size="10" text-anchor="end">{y0:.3g}</text>',
        f'<text x="{LEFT}" y="{bottom + 14}" font-size="10">{x0}</text>',
        f'<text x="{right}" y="{bottom + 14}" font-size="10" text-anchor="end">{x1}</text>',
        f'<text x="{(LEFT + right) / 2:.0f}" y="{bottom + 28}" font-size="10" '
        f'text-anchor="middle">step</text>',
    ]
