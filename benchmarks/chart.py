"""
The chart of the README: one bar group per operation, one bar per contender, speed
relative to Django's stock PyLibMCCache on the 3-node cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backends import BASELINE

TINY_BAR = 0.1
"""Bars lower than this get their value written on them, or they would read as zero."""
LEGEND_COLUMNS = 4
"""Legend entries per row under the chart: seven in one row would not fit its width."""

CHART_TITLE = (
    "Speed relative to Django's PyLibMCCache (static node list, our behaviours), "
    "3-node LocalCluster; higher is faster"
)


def draw(results: Mapping[str, Any], path: Path) -> None:
    """One bar group per operation, one bar per contender, speed relative to stock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versus = results["summary"]["versus_stock"]
    cases = list(versus)
    names = [name for name in results["contenders"] if name != BASELINE]
    width = 0.8 / len(names)
    figure, axes = plt.subplots(figsize=(16, 6.5), dpi=100)
    for index, name in enumerate(names):
        offsets = [i + (index - (len(names) - 1) / 2) * width for i in range(len(cases))]
        heights = [versus[case][name] for case in cases]
        axes.bar(offsets, heights, width, label=results["contenders"][name])
        for offset, height in zip(offsets, heights, strict=True):
            if height < TINY_BAR:
                axes.annotate(
                    f"{height:.2f}",
                    (offset, height),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    axes.axhline(1.0, color="black", linewidth=0.8, label=results["contenders"][BASELINE])
    axes.set_xticks(range(len(cases)), cases, rotation=40, ha="right")
    axes.set_ylabel("speed / stock PyLibMCCache")
    axes.set_title(CHART_TITLE)
    columns = min(len(names) + 1, LEGEND_COLUMNS)
    axes.legend(ncols=columns, loc="upper center", bbox_to_anchor=(0.5, -0.32))
    axes.grid(axis="y", alpha=0.3)
    axes.set_xlim(-0.6, len(cases) - 0.4)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
