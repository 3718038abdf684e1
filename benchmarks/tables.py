"""
The report as data: sections of tables and notes, written out as plain text for the
terminal and as reStructuredText for the README, from the same model.

The tables are drawn by ``tabulate``: it writes both a plain "simple" table and an RST
simple table from one list of rows, so the two forms cannot drift apart, and it is a
small, dependency-free library that has kept these formats stable for a decade. Numbers
arrive already formatted (units, signs, thousands separators), so its number parsing is
turned off.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tabulate import tabulate

RST_WIDTH = 88


@dataclass(frozen=True)
class Table:
    """A header and rows of formatted cells, the first column naming the row, and what
    the table shows in a sentence."""

    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""

    @classmethod
    def of(cls, header: Sequence[str], rows: Iterable[Sequence[str]], caption: str = "") -> Table:
        return cls(list(header), [list(row) for row in rows], caption)

    def text(self) -> str:
        """Labels left, figures right, as a terminal reader scans a column of numbers."""
        align = ("left", *("right" for _ in self.header[1:]))
        table = tabulate(
            self.rows, self.header, tablefmt="simple", colalign=align, disable_numparse=True
        )
        return f"{self.caption}\n{table}" if self.caption else table

    def rst(self) -> list[str]:
        table = tabulate(self.rows, self.header, tablefmt="rst", disable_numparse=True)
        return [*(paragraph(self.caption) if self.caption else []), table, ""]


@dataclass(frozen=True)
class Notes:
    """Sentences that read figures out of the tables: indented lines, or RST bullets."""

    lines: Sequence[str]


@dataclass(frozen=True)
class Paragraph:
    """Prose for the README only: the terminal shows the tables and their notes."""

    text: str


Block = Table | Notes | Paragraph


@dataclass(frozen=True)
class Section:
    """A titled part of the report: its title heads both forms."""

    title: str
    blocks: Sequence[Block] = field(default_factory=list)


def text(sections: Iterable[Section]) -> str:
    parts = []
    for section in sections:
        lines = [section.title]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append(block.text())
            elif isinstance(block, Notes):
                lines += [f"  {line}" for line in block.lines]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def rst(sections: Iterable[Section]) -> str:
    lines: list[str] = []
    for section in sections:
        lines += [section.title, "-" * len(section.title), ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines += block.rst()
            elif isinstance(block, Notes):
                lines += bullets(block.lines)
            else:
                lines += paragraph(block.text)
    return "\n".join(lines)


def paragraph(text: str) -> list[str]:
    return [*textwrap.wrap(text, RST_WIDTH, break_long_words=False, break_on_hyphens=False), ""]


def bullets(items: Iterable[str]) -> list[str]:
    lines = []
    for item in items:
        lines += textwrap.wrap(
            item,
            RST_WIDTH,
            initial_indent="* ",
            subsequent_indent="  ",
            break_long_words=False,
            break_on_hyphens=False,
        )
    return [*lines, ""]


def fmt_us(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


def fmt_added(value: float) -> str:
    return f"{value:+.1f}" if abs(value) < 1000 else f"{value:+,.0f}"
