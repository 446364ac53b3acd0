#!/usr/bin/env python3
"""The margins of the suite's rounding tolerances over `make test-portable`'s runs.

Each test's `check_tol` / `check_min` / `assert_close` (tests/common/mod.rs) appends, when
HIFI_TOL_LOG names a file, `kind TAB file:line TAB test TAB what TAB observed TAB bound`.
`make test-portable` runs the suite once per CPU capability x thread count, each into its own
log. This script takes those logs, and for each check (file:line + what) keeps the worst
observation over all runs: for `max` checks margin = bound / observed, for `min` checks
margin = observed / floor. It prints the smallest margins first and exits 1 when any check's
margin is under MIN_MARGIN (the brief: >= 5x over what the runs show), or when a log is missing.

    python3 scripts/tolerance_margins.py target/portable/*.tsv [--min-margin 5] [--show 25]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("logs", nargs="+", type=Path)
    ap.add_argument("--min-margin", type=float, default=5.0)
    ap.add_argument("--show", type=int, default=25)
    a = ap.parse_args()
    worst: dict[tuple[str, str], tuple[float, float, float, str, str]] = {}
    for log in a.logs:
        if not log.exists():
            print(f"missing log {log}", file=sys.stderr)
            return 1
        for line in log.read_text().splitlines():
            kind, at, test, what, obs, bound = line.split("\t")
            obs, bound = float(obs), float(bound)
            if kind == "max":
                margin = math.inf if obs == 0 else bound / obs
            else:
                margin = math.inf if bound <= 0 else obs / bound
            key = (at, what)
            if key not in worst or margin < worst[key][0]:
                worst[key] = (margin, obs, bound, log.stem, f"{kind} {test}")
    rows = sorted(worst.items(), key=lambda kv: kv[1][0])
    print(f"{len(rows)} tolerance checks over {len(a.logs)} runs ({', '.join(l.stem for l in a.logs)}); smallest margins:")
    print(f"{'margin':>8}  {'observed':>10}  {'bound':>10}  {'run':<12} check")
    bad = 0
    for i, ((at, what), (m, obs, bound, run, kt)) in enumerate(rows):
        low = m < a.min_margin
        bad += low
        if i < a.show or low:
            print(f"{m:8.1f}  {obs:10.3e}  {bound:10.3e}  {run:<12} {at} {kt}: {what}{'   <-- under ' + str(a.min_margin) if low else ''}")
    if bad:
        print(f"{bad} check(s) have a margin under {a.min_margin}x: widen the tolerance (with a comment) or fix the cause")
        return 1
    if not rows:
        print("no tolerance checks were recorded (HIFI_TOL_LOG not passed to the tests?)")
        return 1
    print(f"every check keeps a margin of at least {a.min_margin}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
