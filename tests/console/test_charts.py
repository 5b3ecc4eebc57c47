"""The server-side SVG charts: well-formed, titled and described, scaled to their data."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from app.console import charts

_NS = "{http://www.w3.org/2000/svg}"


def parse(markup: str) -> ET.Element:
    return ET.fromstring(
        str(markup).replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1)
    )


def test_bar_chart_is_an_accessible_image_with_one_bar_per_nonzero_value() -> None:
    svg = parse(
        charts.bar_chart(
            "Spend <per> day",
            "total $3",
            ["a", "b", "c"],
            [charts.Series("spend", charts.BLUE, [1.0, 0.0, 2.0])],
            fmt=charts.usd,
        )
    )
    assert svg.get("role") == "img"
    title, desc = svg.find(f"{_NS}title"), svg.find(f"{_NS}desc")
    assert title is not None and title.text == "Spend <per> day"  # escaped, then read back
    assert desc is not None and desc.text == "total $3"
    assert set((svg.get("aria-labelledby") or "").split()) == {title.get("id"), desc.get("id")}
    bars = svg.findall(f"{_NS}rect")
    assert len(bars) == 2
    heights = sorted(float(b.get("height") or 0) for b in bars)
    assert heights[1] == 2 * heights[0]


def test_stacked_series_and_whole_number_axes() -> None:
    svg = parse(
        charts.bar_chart(
            "Requests",
            "",
            ["d1"],
            [
                charts.Series("success", charts.GREEN, [3]),
                charts.Series("failed", charts.RED, [1]),
            ],
        )
    )
    labels = [t.text for t in svg.iter(f"{_NS}text")]
    # The axis top is even so its half is a whole number: 0, 2, 4 for a total of 4.
    assert labels[:3] == ["0", "2", "4"]


def test_axis_tops_fit_tiny_dollar_amounts() -> None:
    assert charts._nice_max(0.000005) == pytest.approx(0.000005)
    assert charts._nice_max(0.0000051) == pytest.approx(0.00001)
    assert charts._nice_max(1) == 1
    assert charts._nice_max(1, whole=True) == 2
    assert charts._nice_max(7, whole=True) == 8
    assert charts._nice_max(26, whole=True) == 50
    assert charts.usd(0.000004) == "$0.000004"
    assert charts.usd(0) == "$0"


def test_scatter_marks_the_served_and_the_dropped() -> None:
    svg = parse(
        charts.scatter_chart(
            "Quotes",
            "",
            [
                charts.Point("a", 10, 0.00001, True, "", chosen=True),
                charts.Point("b", None, 0.00002, False, "", dropped=True),
            ],
            "ms",
        )
    )
    circles = svg.findall(f"{_NS}circle")
    assert len(circles) == 3  # two points and the ring of the served one
    assert len(svg.findall(f"{_NS}path")) == 1  # the cross of the dropped one
    assert "?" in [t.text for t in svg.iter(f"{_NS}text")]  # b's latency is unknown


def test_timeline_lays_attempts_end_to_end() -> None:
    svg = parse(
        charts.timeline_chart(
            "Attempts",
            "",
            [charts.Span("a", 100, False, "failed"), charts.Span("b", 300, True, "success")],
        )
    )
    first, second = svg.findall(f"{_NS}rect")
    assert float(second.get("x") or 0) == float(first.get("x") or 0) + float(
        first.get("width") or 0
    )
    assert float(second.get("width") or 0) == 3 * float(first.get("width") or 0)


def test_sparkline_marks_the_probes_that_found_the_provider_down() -> None:
    svg = parse(charts.sparkline("x", [10, None, 30], [True, False, True]))
    assert len(svg.findall(f"{_NS}line")) == 1
    assert "down in 1" in (svg.find(f"{_NS}desc").text or "")  # type: ignore[union-attr]
    empty = parse(charts.sparkline("x", [], []))
    assert "no history" in ET.tostring(empty, encoding="unicode")
