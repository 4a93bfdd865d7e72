"""Berth scheduling for the quiet harbour: who may moor where, and when."""

from dataclasses import dataclass
from datetime import datetime, timedelta

HIGH_WATER_MARGIN = timedelta(minutes=45)  # keep clear of the bar around high water


@dataclass
class Vessel:
    name: str
    length_m: float
    draught_m: float


@dataclass
class Berth:
    number: int
    max_length_m: float
    depth_m: float

    def fits(self, vessel: Vessel, tide_m: float) -> bool:
        """A vessel fits when it is short enough and floats with half a metre to spare."""
        return vessel.length_m <= self.max_length_m and vessel.draught_m + 0.5 <= self.depth_m + tide_m


def assign(vessels: list[Vessel], berths: list[Berth], tide_m: float) -> dict[str, int]:
    """Greedy assignment: longest vessels first, each to the smallest berth that fits."""
    free = sorted(berths, key=lambda b: b.max_length_m)
    plan = {}
    for v in sorted(vessels, key=lambda v: -v.length_m):
        for b in free:
            if b.fits(v, tide_m):
                plan[v.name] = b.number
                free.remove(b)
                break
    return plan


def next_window(high_water: datetime) -> tuple[datetime, datetime]:
    """The safe crossing window over the bar for the tide peaking at `high_water`."""
    return high_water - 2 * HIGH_WATER_MARGIN, high_water - HIGH_WATER_MARGIN
