"""Tests of server.validation: the checks of a site's update."""

from __future__ import annotations

import numpy as np
import pytest

from server.validation import update_norm, validate_update, validate_weight


def _ref() -> dict[str, np.ndarray]:
    return {
        "w": np.zeros((2, 3), np.float32),
        "b": np.zeros(3, np.float32),
        "n": np.array(0, np.int64),
    }


def test_validate_update_cases():
    ref = _ref()
    clean = {"w": np.full((2, 3), 0.1, np.float32), "b": np.ones(3, np.float32), "n": np.array(7, np.int64)}
    assert validate_update(clean, ref) is None
    assert validate_update(clean, ref, bound=10.0) is None
    assert update_norm(clean, ref) == pytest.approx(np.sqrt(6 * 0.01 + 3), rel=1e-5)  # ints do not count
    assert update_norm(clean, ref, norm_keys={"w"}) == pytest.approx(np.sqrt(0.06), rel=1e-5)

    assert "unexpected keys: x" == validate_update({**clean, "x": np.zeros(1, np.float32)}, ref)
    assert "missing keys: b" == validate_update({k: v for k, v in clean.items() if k != "b"}, ref)
    assert "shape of w" in validate_update({**clean, "w": np.zeros((3, 2), np.float32)}, ref)
    assert "dtype of w" in validate_update({**clean, "w": clean["w"].astype(np.float64)}, ref)
    assert "dtype of n" in validate_update({**clean, "n": np.array(7.0, np.float32)}, ref)
    nan = clean["b"].copy()
    nan[1] = np.nan
    assert validate_update({**clean, "b": nan}, ref) == "non-finite values in b"
    inf = clean["w"].copy()
    inf[0, 0] = -np.inf
    assert validate_update({**clean, "w": inf}, ref) == "non-finite values in w"
    reason = validate_update(clean, ref, bound=1.0)
    assert reason is not None and "above the bound" in reason
    assert validate_update(clean, ref, bound=1.0, norm_keys={"w"}) is None  # only w's norm (0.24) counts
    assert validate_update(clean, ref, bound=0.0) is None  # 0: off
    # the reason never carries array content
    secret = {**clean, "w": np.full((2, 3), 123.456, np.float32)}
    assert "123.4" not in (validate_update(secret, ref, bound=1.0) or "")

    assert validate_weight(10) is None and validate_weight(2.5) is None
    for bad in (0, -1, float("nan"), float("inf"), True, "3", None):
        assert validate_weight(bad) is not None
