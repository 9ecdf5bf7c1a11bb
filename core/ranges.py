"""Offset ranges: sorted, non-overlapping `(first, last)` pairs, both ends included.

The warehouse sink keeps the offsets it has loaded this way, and the DLQ tools the records
they have redriven.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

Range = tuple[int, int]


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, non-overlapping ranges, adjacent ones joined."""
    merged: list[Range] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def in_ranges(merged: list[Range], offset: int) -> bool:
    """Whether `offset` lies in one of `merged` (as `merge_ranges` returns them)."""
    i = bisect.bisect_right(merged, (offset, 1 << 62)) - 1
    return i >= 0 and merged[i][0] <= offset <= merged[i][1]
