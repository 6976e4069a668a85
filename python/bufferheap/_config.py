"""Validation of the settings handed to bufferheap_configure (pure Python, no library needed)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Union

POLICIES = ("default", "mps")
# The library's bounds: the largest ratio, and the high ratio it starts with when none is set.
MAX_RATIO = 2.0
DEFAULT_HIGH = 1.7

Number = Union[int, float]


def _ratio(name: str, value: Number) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= MAX_RATIO:
        raise ValueError(f"{name} must be between 0 (disables the limit) and {MAX_RATIO}, got {value}")
    return value


def check_watermarks(low: Optional[Number], high: Optional[Number]) -> Tuple[Optional[float], Optional[float]]:
    """Both ratios validated; low may not exceed high (the default one when high is unset)
    while high is a limit (> 0)."""
    low = None if low is None else _ratio("low_watermark_ratio", low)
    high = None if high is None else _ratio("high_watermark_ratio", high)
    in_force = DEFAULT_HIGH if high is None else high
    if low is not None and in_force > 0.0 and low > in_force:
        unset = "" if high is not None else " (the default; set high_watermark_ratio too)"
        raise ValueError(f"low_watermark_ratio ({low}) must not exceed high_watermark_ratio ({in_force}){unset}")
    return low, high


def _format_ratio(value: float) -> str:
    return repr(float(value))


def configuration(
    policy: str = "default",
    low_watermark_ratio: Optional[Number] = None,
    high_watermark_ratio: Optional[Number] = None,
    debug: Union[None, bool, int] = None,
    history: Optional[int] = None,
    front_cache_bytes: Optional[int] = None,
    idle_page_fraction: Optional[Number] = None,
    unmap_rate_limit: Optional[Number] = None,
) -> List[Tuple[str, str]]:
    """The (key, value) pairs for bufferheap_configure, in the order they are applied.

    Settings left as None are not sent: the library keeps its defaults for them. The high
    ratio goes first so that the library can check the low one against it.
    """
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    low, high = check_watermarks(low_watermark_ratio, high_watermark_ratio)
    pairs = [("policy", policy)]
    if high is not None:
        pairs.append(("high_watermark_ratio", _format_ratio(high)))
    if low is not None:
        pairs.append(("low_watermark_ratio", _format_ratio(low)))
    if debug is not None:
        if not isinstance(debug, (bool, int)) or not 0 <= int(debug) < 1 << 32:
            raise ValueError(f"debug must be a bool or an int of 32 flag bits (verbosity flags); got {debug!r}")
        pairs.append(("debug", str(int(debug))))
    if history is not None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be a non-negative int (allocator events kept for snapshots); got {history!r}")
        pairs.append(("history", str(history)))
    if front_cache_bytes is not None:
        if isinstance(front_cache_bytes, bool) or not isinstance(front_cache_bytes, int) or front_cache_bytes < 0:
            raise ValueError(
                f"front_cache_bytes must be a non-negative int (bytes each thread may keep cached, 0: none); "
                f"got {front_cache_bytes!r}"
            )
        pairs.append(("front_cache_bytes", str(front_cache_bytes)))
    for name, value, meaning in (
        ("idle_page_fraction", idle_page_fraction,
         "reserved bytes allowed over the most ever placed before idle pages are unmapped"),
        ("unmap_rate_limit", unmap_rate_limit,
         "page unmaps per 1000 allocations before the page budget loosens, 0: never"),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0 ({meaning}); got {value!r}")
        pairs.append((name, _format_ratio(value)))
    return pairs


def as_dict(pairs: List[Tuple[str, str]]) -> Dict[str, str]:
    return dict(pairs)
