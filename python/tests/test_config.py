"""Validation of allocator settings (pure Python)."""

import math

import pytest

from bufferheap import _config


def test_defaults_send_only_the_policy():
    assert _config.configuration() == [("policy", "default")]


def test_all_settings_in_order():
    pairs = _config.configuration("mps", low_watermark_ratio=1, high_watermark_ratio=1.7, debug=True)
    assert pairs == [
        ("policy", "mps"),
        ("high_watermark_ratio", "1.7"),
        ("low_watermark_ratio", "1.0"),
        ("debug", "1"),
    ]


def test_debug_flags_and_zero_ratios():
    pairs = dict(_config.configuration(low_watermark_ratio=0, high_watermark_ratio=0, debug=6))
    assert pairs["low_watermark_ratio"] == "0.0" and pairs["high_watermark_ratio"] == "0.0"
    assert pairs["debug"] == "6"
    assert dict(_config.configuration(debug=False))["debug"] == "0"


@pytest.mark.parametrize("policy", ["", "Default", "native", None, 1])
def test_bad_policy(policy):
    with pytest.raises(ValueError, match="policy must be one of default, mps"):
        _config.configuration(policy)


@pytest.mark.parametrize("value", [-0.1, math.inf, math.nan, 2.5])
def test_bad_ratio_values(value):
    with pytest.raises(ValueError, match="between 0 .disables the limit. and 2.0"):
        _config.configuration(high_watermark_ratio=value)
    with pytest.raises(ValueError, match="between 0 .disables the limit. and 2.0"):
        _config.configuration(low_watermark_ratio=value)


def test_low_is_checked_against_the_default_high_when_high_is_unset():
    # The library would start with high 1.7 and refuse a low of 1.8 at the first allocation.
    with pytest.raises(ValueError, match=r"\(the default; set high_watermark_ratio too\)"):
        _config.configuration(low_watermark_ratio=1.8)
    assert dict(_config.configuration(low_watermark_ratio=1.8, high_watermark_ratio=2.0))["low_watermark_ratio"] == "1.8"
    assert dict(_config.configuration(low_watermark_ratio=1.8, high_watermark_ratio=0))["low_watermark_ratio"] == "1.8"


def test_debug_flags_fit_32_bits():
    with pytest.raises(ValueError, match="32 flag bits"):
        _config.configuration(debug=1 << 40)


@pytest.mark.parametrize("value", ["1.0", True, [1]])
def test_bad_ratio_types(value):
    with pytest.raises(TypeError, match="must be a number"):
        _config.configuration(low_watermark_ratio=value)


def test_low_above_high():
    with pytest.raises(ValueError, match="must not exceed"):
        _config.configuration(low_watermark_ratio=1.5, high_watermark_ratio=1.0)
    # high = 0 means no upper limit: any low ratio is fine
    assert dict(_config.configuration(low_watermark_ratio=1.5, high_watermark_ratio=0))["low_watermark_ratio"] == "1.5"


@pytest.mark.parametrize("debug", [-1, "yes", 1.5])
def test_bad_debug(debug):
    with pytest.raises(ValueError, match="debug must be"):
        _config.configuration(debug=debug)


def test_history_is_sent_as_a_count():
    assert ("history", "5000") in _config.configuration(history=5000)
    assert all(k != "history" for k, _ in _config.configuration())
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="history"):
            _config.configuration(history=bad)


def test_front_cache_bytes_is_sent_as_bytes():
    assert ("front_cache_bytes", "0") in _config.configuration(front_cache_bytes=0)
    assert all(k != "front_cache_bytes" for k, _ in _config.configuration())
    for bad in (-1, 2.5, False, "1"):
        with pytest.raises(ValueError, match="front_cache_bytes"):
            _config.configuration(front_cache_bytes=bad)


def test_idle_page_fraction_is_sent_as_a_ratio():
    assert ("idle_page_fraction", "0.02") in _config.configuration(idle_page_fraction=0.02)
    for bad in (-0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="idle_page_fraction"):
            _config.configuration(idle_page_fraction=bad)


def test_unmap_rate_limit_is_sent_as_a_ratio():
    assert ("unmap_rate_limit", "0.0") in _config.configuration(unmap_rate_limit=0)
    for bad in (-1, float("inf"), False, "2"):
        with pytest.raises(ValueError, match="unmap_rate_limit"):
            _config.configuration(unmap_rate_limit=bad)
