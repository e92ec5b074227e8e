"""The shapes of the lines our jobs print, for the tests that check a console holds ours and nothing else
(no line of Ray's: its start, Ray Data's and Ray Train's lines, its C++ core's, worker output)."""

from __future__ import annotations

import re

N = r"[\d,]+"  # 1,234
X = r"[\d.]+"  # 0.9111
PROGRESS = re.compile(rf"(reading photos|evaluating|tagging|epoch \d+/\d+): {N}/{N} \w+ \(\d+%\), \S+ \w+/s, \S+ left")
EPOCH = re.compile(rf"epoch \d+/\d+: loss {X}, train accuracy {X}(, validation accuracy {X})?, {N} (images|photos)/s, {X} s")

OURS = [re.compile(p) for p in (
    # training
    r"run \S+: checkpoints in .+ \(if this run is interrupted, start it again with --run-name \S+ to resume it\)",
    r"run \S+ has a checkpoint after epoch \d+: resuming from it",
    r"(training )?resumed from the checkpoint after epoch \d+",
    rf"skipped {N} file\(s\) that cannot be read \(.+\): listed in metrics\.json",
    rf"read {N} photos in {X} s",
    rf"training on {N} (images|photos) of \d+ classes from .+: .+, \d+ epoch\(s\)",
    r"training data: .+ \(.+\)",
    r"sized to what is free: the cluster has .+, free now: .+ \(the rest held by other work\)",
    EPOCH.pattern,
    PROGRESS.pattern,
    rf"accuracy {X} over {N} (test images|evaluation photos)",
    rf"weakest classes \(recall\): .+ {X}",
    r"outputs in \S+: report\.html \(the run's report\), metrics\.json, predictions\.parquet, checkpoint/",
    # tagging
    rf"tagging {N} files from .+ with \d+ predictor actor\(s\)",
    rf"tagged {N} of {N} files in {X} s \({N} files/s\)",
    r"tag +count",
    rf"[^\s:()]+(?: [^\s:()]+)* +{N}",  # a row of the tag counts
    rf"needs review \(confidence below {X}\): {N}",
    rf"failed: {N}( \(.+\))?",
    r"predictor actors ran on \d+ node\(s\): .+",
    r"tags in \S+; the photos to review in \S+",
)]


def not_ours(console: str) -> list[str]:
    """The non-empty lines of `console` that none of our shapes matches."""
    return [line for line in console.splitlines() if line.strip() and not any(p.fullmatch(line) for p in OURS)]


def check_only_ours(console: str, at_most: int) -> list[str]:
    """Every non-empty line is one of ours, and there are at most `at_most` of them; returns them."""
    strangers = not_ours(console)
    assert not strangers, "lines that are not ours:\n" + "\n".join(strangers[:20])
    lines = [line for line in console.splitlines() if line.strip()]
    assert len(lines) <= at_most, f"{len(lines)} lines:\n" + "\n".join(lines)
    return lines
