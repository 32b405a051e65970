"""Plot a benchmark run's summary as one PNG (run with bench/.venv-tools' python: matplotlib).

    bench/.venv-tools/bin/python bench/plot.py bench/results/bench-....json out.png

Reads the ``summary`` block bench/run.py writes; every panel is a log-scale bar chart with each
bar's value, and in the throughput panels the gateway's and Portkey's ratio to the LiteLLM row.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {
    "direct": "#7f7f7f",
    "gateway": "#1f77b4",
    "gateway-lean": "#98df8a",
    "gateway-cache": "#17becf",
    "baseline": "#aec7e8",
    "floor": "#9467bd",
    "portkey": "#ff7f0e",
    "litellm": "#d62728",
    "runner-httpx": "#1f77b4",
    "runner-aiohttp": "#2ca02c",
}

# Rows whose bars carry their ratio to LiteLLM's (the others' would overlap them).
RATIO_ROWS = ("gateway", "portkey", "runner-httpx", "runner-aiohttp")

PANELS: list[tuple[str, list[tuple[str, str]], str, bool]] = [
    # title, [(summary key, series label)], unit, show ratio to LiteLLM
    ("64 clients: throughput (higher is better)", [("chat_64_rps", "chat"), ("embed_64_rps", "embeddings")],
     "req/s", True),
    ("One client: latency (lower is better)", [("latency_1_p50_ms", "p50"), ("latency_1_p99_ms", "p99")],
     "ms", False),
    ("Canned SSE: streams/s (higher is better)", [("sse_16_rps", "16 streams"), ("sse_256_rps", "256 streams")],
     "streams/s", True),
    ("Paced SSE: time to first byte p50 (lower is better)",
     [("paced_16_ttfb_p50_ms", "16 streams"), ("paced_256_ttfb_p50_ms", "256 streams")], "ms", False),
    ("Proxy CPU per request / per chunk (lower is better)",
     [("chat_64_cpu_ms_per_req", "ms/request (chat, 64)"), ("paced_256_cpu_us_per_chunk", "us/chunk (256 paced)")],
     "ms | us", False),
    ("Memory and start-up (lower is better)",
     [("rest_rss_mb", "RSS at rest, MB"), ("peak_rss_mb", "peak RSS, MB"), ("startup_ms", "start-up, ms")], "", False),
]  # fmt: skip


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2g}" if value < 1 else f"{value:.2f}"


def plot(results: dict[str, Any], out: Path) -> None:
    summary: dict[str, dict[str, float | None]] = results["summary"]
    labels: dict[str, str] = results.get("labels", {})
    rows = list(summary)
    meta = results["meta"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    for ax, (title, series, unit, ratio) in zip(axes.flat, PANELS, strict=True):
        width = 0.8 / len(rows)
        drawn = False
        for i, row in enumerate(rows):
            points = []
            for j, (key, _) in enumerate(series):
                value = summary[row].get(key)
                if value is not None and value > 0:
                    points.append((j + (i - (len(rows) - 1) / 2) * width, float(value), key))
            if not points:
                continue
            drawn = True
            bars = ax.bar(
                [x for x, _, _ in points], [y for _, y, _ in points], width * 0.95,
                label=labels.get(row, row), color=COLORS.get(row),
            )  # fmt: skip
            for bar, (_, value, key) in zip(bars, points, strict=True):
                text = _fmt(value)
                lite = summary.get("litellm", {}).get(key)
                if ratio and lite and row in RATIO_ROWS:
                    times = value / lite
                    text += f"\n{times:.2g}x LiteLLM" if times < 10 else f"\n{times:.0f}x LiteLLM"
                ax.annotate(
                    text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7, xytext=(0, 2), textcoords="offset points",
                )  # fmt: skip
        ax.set_xticks(range(len(series)), [label for _, label in series], fontsize=8)
        ax.set_title(title, fontsize=10)
        if drawn:
            ax.set_yscale("log")
            ax.margins(y=0.25)
        if unit:
            ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3, which="both")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(rows), fontsize=9, bbox_to_anchor=(0.5, 0.995))
    fig.suptitle(
        f"{meta.get('date', '')}: {meta.get('nproc')} CPUs ({meta.get('cpu_model')}), {meta.get('pinning')}; "
        f"LiteLLM {meta.get('litellm', 'not measured')}; "
        f"Portkey {meta.get('portkey', {}).get('@portkey-ai/gateway', 'not measured')}",
        fontsize=9,
        y=0.955,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(out, dpi=110)


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: plot.py RESULTS.json OUT.png", file=sys.stderr)
        return 2
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
