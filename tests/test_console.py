import re

from clf import console
from tests.console_lines import PROGRESS


def test_a_progress_line_says_how_far_how_fast_and_how_long_is_left():
    # A slow phase (a rate under 10/s, which tqdm pads) and a fast one: the shape the console tests accept, and
    # the numbers of the phase as it went.
    for done, elapsed in ((3, 2.0), (127, 14.5), (9_000, 1.5)):
        progress = console.Progress("epoch 2/3", 10_000, "images")
        assert progress.bar is None  # pytest's stdout is not a terminal
        progress.done, progress.started = done, progress.started - elapsed
        line = progress.line()
        assert PROGRESS.fullmatch(line) and "  " not in line, line
        shown = re.fullmatch(r"epoch 2/3: ([\d,]+)/10,000 images \((\d+)%\), ([\d.]+) images/s, (\d+):(\d\d)(?::(\d\d))? left",
                             line)
        assert shown, line
        count, percent, rate = int(shown[1].replace(",", "")), int(shown[2]), float(shown[3])
        seconds = [int(part) for part in shown.groups()[3:] if part is not None]
        left = sum(value * 60 ** power for power, value in enumerate(reversed(seconds)))
        assert count == done and percent == round(100 * done / 10_000)
        assert abs(rate - done / elapsed) <= 0.02 * done / elapsed  # the rate of the phase so far
        assert abs(left - (10_000 - done) / (done / elapsed)) <= 1 + 0.02 * left  # at that rate, the rest
