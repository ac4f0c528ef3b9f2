"""The report's HTML comes from markdown-it-py, and the noise test from scipy's Mann-Whitney U."""
from __future__ import annotations

from autotiacc.measure import Timing, faster_beyond_noise, mann_whitney_p_less
from autotiacc.report.inference import _html


def test_html_lists_tables_and_escaping():
    secs = [("Summary", ["- first **point**", "- second `code`", "",
                         "| a | b |", "|---|---|", "| 1 | <script>x</script> |"])]
    out = _html("t <1>", secs, {})
    assert "<ul>" in out and out.index("<ul>") < out.index("<li>first <strong>point</strong></li>")
    assert "<li>second <code>code</code></li>" in out and "</ul>" in out
    assert "<table>" in out and "<td>1</td>" in out
    assert "<script>" not in out and "&lt;script&gt;" in out  # user strings (labels, reasons) stay inert
    assert "<title>t &lt;1&gt;</title>" in out


def test_mann_whitney_ties_are_not_a_speed_up():
    # Quantised timers give many ties; a tie-blind test called identical samples different.
    same = [1.0, 1.0, 1.0, 1.1, 1.1, 0.9] * 5
    assert mann_whitney_p_less(same, list(same)) > 0.4
    assert not faster_beyond_noise(Timing(same), Timing(list(same)))
    # Exact small-sample value: 3 vs 3 fully separated -> 1 / C(6, 3) = 0.05
    assert abs(mann_whitney_p_less([1, 2, 3], [4, 5, 6]) - 0.05) < 1e-9
    assert mann_whitney_p_less([], [1.0]) == 1.0
