"""Progress reports: a tqdm bar on a terminal, and in a log file (a cluster job's output) a plain line
at most every --progress_interval seconds instead of a bar redrawn on every step."""

from __future__ import annotations

import sys
import time
from datetime import timedelta

from tqdm.auto import tqdm

DEFAULT_PROGRESS_INTERVAL = 30.0
PROGRESS_INTERVAL_HELP = "Without a terminal (a log file): seconds between progress lines."


def progress_bar(
    total: float,
    desc: str,
    initial: float = 0,
    disable: bool = False,
    unit: str = "it",
    interval: float = DEFAULT_PROGRESS_INTERVAL,
    stream=None,
    **tqdm_options,
):
    """tqdm when `stream` (default stderr, where tqdm writes) is a terminal; otherwise a LineProgress,
    which has the methods the scripts use (update, set_postfix, set_postfix_str, close)."""
    stream = stream or sys.stderr
    if disable or _is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=stream, **tqdm_options)
    return LineProgress(total, desc, initial, unit, interval, stream)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """One line per report: 'desc: n/total unit (pct) elapsed, rate, postfix'. A line is written when
    `interval` seconds have passed since the last one, and a last one on close (if anything moved)."""

    def __init__(self, total, desc, initial=0, unit="it", interval=DEFAULT_PROGRESS_INTERVAL, stream=None, clock=None):
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.interval, self.stream = max(float(interval), 0.0), stream or sys.stderr
        self.clock = clock or time.monotonic
        self.start = self.last_print = self.clock()
        self.start_n, self.postfix, self.printed_n, self.closed = initial, "", initial, False

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.clock() - self.last_print >= self.interval:
            self._print()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **values}.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self.closed and self.n != self.printed_n:
            self._print()
        self.closed = True

    def line(self) -> str:
        elapsed = self.clock() - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        parts = [
            f"{self.desc}: {_amount(self.n)}/{_amount(self.total)} {self.unit}{share}",
            f"{timedelta(seconds=round(elapsed))} elapsed",
            f"{rate:.3g} {self.unit}/s",
        ]
        return ", ".join(parts + ([self.postfix] if self.postfix else []))

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_print, self.printed_n = self.clock(), self.n


def _amount(value) -> str:
    return str(value) if isinstance(value, int) or value is None else f"{value:.3f}"
