"""Charts drawn on the server as inline SVG: no script, nothing loaded from elsewhere.

Each chart is an ``<svg role="img">`` with a title and a description for screen readers; every
bar or point has a ``<title>`` (its tooltip) and ``data-label``/``data-value`` attributes, and the
page shows the same numbers in a table beside it. Colours keep a contrast of at least 3:1 against
the white background (WCAG 2.1, 1.4.11).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape
from typing import Final

from markupsafe import Markup

# Okabe-Ito hues darkened where needed: each at least 3:1 on white, told apart by colour-blind readers.
PALETTE: Final = ("#0b5cad", "#b35900", "#1a7f4e", "#a3207a", "#5c4bb3", "#8a6d00", "#c0392b", "#4a4a4a")
WIDTH, HEIGHT = 760, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 12, 36


def bar_chart(chart_id: str, title: str, points: Sequence[tuple[str, float]], fmt: Callable[[float], str]) -> Markup:
    """Vertical bars, one per (label, value), in order (a time series)."""
    top = max((v for _, v in points), default=0.0) or 1.0
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = inner_w / max(len(points), 1)
    parts = [_frame(chart_id, title, f"{len(points)} bars; the table below lists the same values.")]
    parts += _axis(top, fmt)
    for i, (label, value) in enumerate(points):
        h = inner_h * value / top
        x, y = LEFT + i * step, TOP + inner_h - h
        text = escape(f"{label}: {fmt(value)}")
        parts.append(
            f'<rect class="bar" x="{x + step * 0.1:.1f}" y="{y:.1f}" width="{max(step * 0.8, 1):.1f}" '
            f'height="{h:.1f}" fill="{PALETTE[0]}" data-label="{escape(label)}" data-value="{value:.6g}">'
            f"<title>{text}</title></rect>"
        )
    parts += _x_labels([label for label, _ in points], step)
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (every text and attribute above is escaped)


def line_chart(
    chart_id: str,
    title: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    fmt: Callable[[float], str],
) -> Markup:
    """One line per (name, values), over the same labels, with a legend."""
    top = max((v for _, values in series for v in values), default=0.0) or 1.0
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = inner_w / max(len(labels), 1)
    parts = [_frame(chart_id, title, f"{len(series)} lines; the table below lists the same values.")]
    parts += _axis(top, fmt)
    for n, (name, values) in enumerate(series):
        colour = PALETTE[n % len(PALETTE)]
        coords = [(LEFT + (i + 0.5) * step, TOP + inner_h - inner_h * v / top) for i, v in enumerate(values)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        parts.append(f'<g class="series" data-name="{escape(name)}"><polyline points="{path}" fill="none" '
                     f'stroke="{colour}" stroke-width="2"/>')  # fmt: skip
        for (x, y), label, v in zip(coords, labels, values, strict=True):
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}" data-label="{escape(label)}" '
                f'data-value="{v:.6g}"><title>{escape(f"{name}, {label}: {fmt(v)}")}</title></circle>'
            )
        parts.append("</g>")
    parts += _x_labels(labels, step)
    parts.append("</svg>")
    legend = "".join(
        f'<li><span class="swatch" style="background:{PALETTE[n % len(PALETTE)]}"></span>{escape(name)}</li>'
        for n, (name, _) in enumerate(series)
    )
    return Markup("".join(parts) + f'<ul class="legend" aria-label="Legend">{legend}</ul>')  # noqa: S704


def _frame(chart_id: str, title: str, description: str) -> str:
    return (
        f'<svg id="{escape(chart_id)}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{escape(chart_id)}-t {escape(chart_id)}-d" preserveAspectRatio="xMidYMid meet">'
        f'<title id="{escape(chart_id)}-t">{escape(title)}</title>'
        f'<desc id="{escape(chart_id)}-d">{escape(description)}</desc>'
    )


def _axis(top: float, fmt: Callable[[float], str]) -> list[str]:
    inner_h = HEIGHT - TOP - BOTTOM
    parts = []
    for frac in (0.0, 0.5, 1.0):
        y = TOP + inner_h * (1 - frac)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#767676" '
                     f'stroke-width="{1 if frac == 0 else 0.5}"/>')  # fmt: skip
        parts.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{escape(fmt(top * frac))}</text>'
        )
    return parts


def _x_labels(labels: Sequence[str], step: float) -> list[str]:
    """About six labels under the axis, cut short ("YYYY-MM-DD HH:00": the hour alone within one
    day, else "MM-DD HH:00"; a day "MM-DD") so they never overlap."""
    every = max(1, -(-len(labels) // 6))
    one_day = len({label[:10] for label in labels}) == 1

    def short(label: str) -> str:
        return label[11:] if one_day and " " in label else label[5:]

    return [
        f'<text x="{LEFT + (i + 0.5) * step:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" class="tick">'
        f"{escape(short(label))}</text>"
        for i, label in enumerate(labels)
        if i % every == 0
    ]
