"""Timeline pictures render valid PNG/SVG files with one bar per (chunk, stage)."""

import re

import matplotlib.image
import pytest

from dcpp.timeline import Bar, bars_from_stage_times, draw_timeline


def test_bars_from_stage_times_is_a_flow_shop():
    bars = bars_from_stage_times([[1.0, 2.0], [1.0, 2.0], [3.0, 1.0]])
    by = {(b.chunk, b.stage): (b.start, b.end) for b in bars}
    assert by[(0, 0)] == (0.0, 1.0) and by[(0, 1)] == (1.0, 3.0)
    assert by[(1, 0)] == (1.0, 2.0) and by[(1, 1)] == (3.0, 5.0)  # waits for stage 1: a bubble
    assert by[(2, 0)] == (2.0, 5.0) and by[(2, 1)] == (5.0, 6.0)


def test_draw_timeline_png_and_svg(tmp_path):
    static = bars_from_stage_times([[0.010, 0.011]] * 2 + [[0.020, 0.021]] * 2)
    dynamic = bars_from_stage_times([[0.014, 0.014]] * 3)
    png, svg = draw_timeline({"static": static, "dynamic": dynamic}, tmp_path / "t")
    img = matplotlib.image.imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # figsize (10, 1 + 0.6 * stages * panels) inches at 110 dpi
    assert img.shape[1] == 1100 and img.shape[0] == int(round((1 + 0.6 * 2 * 2) * 110))
    text = svg.read_text()
    assert len(re.findall(r'id="static-stage\d-chunk\d"', text)) == 8
    assert len(re.findall(r'id="dynamic-stage\d-chunk\d"', text)) == 6
    assert "static: TTFT 82 ms" in text and "dynamic: TTFT 56 ms" in text


@pytest.mark.parametrize("timelines, match", [
    ({}, "timelines is empty"),
    ({"x": []}, "has no bars"),
    ({"x": [Bar(0, 0, 2.0, 1.0)]}, "bad bar"),
])
def test_draw_timeline_rejects_bad_input(tmp_path, timelines, match):
    with pytest.raises(ValueError, match=match):
        draw_timeline(timelines, tmp_path / "t")


def test_measured_beside_simulated_in_two_columns(tmp_path):
    from dcpp.online.bubbles import PrefillBubble
    from dcpp.timeline import bars_from_measured

    measured = PrefillBubble("r", "pipeline", 0.3, (0.2, 0.4), 5.0, (1, 1, 2),
                             bars=((0, 0, 0.0, 1.0), (1, 0, 1.0, 2.0), (0, 1, 1.0, 2.0),
                                   (1, 1, 2.0, 3.0), (0, 2, 2.0, 4.0), (1, 2, 4.0, 5.0)),
                             other_steps=0)
    bars = bars_from_measured(measured)
    assert Bar(1, 2, 4.0, 5.0) in bars and len(bars) == 6
    sim = bars_from_stage_times([[1.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    png, svg = draw_timeline({"sim": sim, "measured": bars, "sim2": sim}, tmp_path / "t",
                             unit="s", ncols=2)
    img = matplotlib.image.imread(png)
    assert img.shape[1] == 7 * 2 * 110 and img.shape[0] == int(round((1 + 0.6 * 2 * 2) * 110))
    text = svg.read_text()
    assert "measured: TTFT 5 s, bubbles 30.0%" in text  # the panel's own idle share
    assert len(re.findall(r'id="measured-stage\d-chunk\d"', text)) == 6
    with pytest.raises(ValueError, match="ncols"):
        draw_timeline({"sim": sim}, tmp_path / "u", ncols=0)
