"""Tests of jras_core.overlays: the slice an overlay shows and the picture itself."""

from __future__ import annotations

import numpy as np

from jras_core.overlays import OverlayPanel, mid_ventricular_slice, overlay_png


def test_the_mid_ventricular_slice_is_the_middle_of_those_with_lv():
    labels = np.zeros((4, 4, 9), dtype=np.uint8)
    labels[1, 1, [2, 3, 4, 5, 6]] = 1
    labels[2, 2, [0, 1]] = 3  # RV alone on the basal slices
    assert mid_ventricular_slice(labels, lv_label=1) == 4
    assert mid_ventricular_slice(labels, lv_label=None) == 3  # any label: slices 0..6
    assert mid_ventricular_slice(np.zeros((4, 4, 9)), lv_label=1) == 4  # nothing: the middle


def test_overlay_png_is_a_png_with_a_panel_per_slice():
    rng = np.random.default_rng(0)
    panels = [OverlayPanel(rng.normal(size=(20, 16)), rng.integers(0, 4, size=(20, 16)), t) for t in ("ED", "ES")]
    one = overlay_png(panels[:1], ["LV", "MYO", "RV"])
    two = overlay_png(panels, ["LV", "MYO", "RV"], title="case")
    assert one[:8] == two[:8] == b"\x89PNG\r\n\x1a\n"
    width = lambda png: int.from_bytes(png[16:20], "big")  # noqa: E731 - the IHDR width
    assert width(two) > width(one)
