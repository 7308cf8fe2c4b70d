"""The toy world's vocabulary: its colours and one drawn shape."""

from __future__ import annotations

from dataclasses import dataclass

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "orange": (245, 130, 30),
    "yellow": (240, 205, 40),
    "green": (46, 150, 70),
    "blue": (40, 90, 200),
    "purple": (125, 60, 170),
    "pink": (240, 130, 175),
    "white": (245, 245, 240),
    "black": (30, 30, 30),
}


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # a key of COLOURS
    cell: tuple[int, int]  # (row, column) in the 3x3 grid
    radius: float  # fraction of a cell
    offset: tuple[float, float]  # centre shift, fraction of a cell
