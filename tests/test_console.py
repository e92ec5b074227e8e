import re

from clf import console
from tests.console_lines import PROGRESS


def test_a_progress_line_has_our_shape_at_any_rate(monkeypatch):
    # A slow phase (a rate under 10/s, which tqdm pads) and a fast one both print the shape the console tests
    # accept.
    for done, elapsed in ((3, 2.0), (127, 14.5), (9_000, 1.5)):
        progress = console.Progress("epoch 2/3", 10_000, "images")
        assert progress.bar is None  # pytest's stdout is not a terminal
        progress.done, progress.started = done, progress.started - elapsed
        line = progress.line()
        assert PROGRESS.fullmatch(line), line
        assert "  " not in line
        assert re.search(rf"{done:,}/10,000 images \(\d+%\), [\d.]+ images/s", line), line
