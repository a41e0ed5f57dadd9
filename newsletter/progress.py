"""A progress line for long sends: count, rate and time left, redrawn on a terminal and
printed every few seconds elsewhere (a log file should not fill with carriage returns)."""

from __future__ import annotations

import sys
import time

from .sender import Progress


class ProgressLine(Progress):
    def __init__(self, stream=None, every: float = 0.2, log_every: float = 10.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every if self.tty else log_every
        self.done = 0
        self.counts: dict[str, int] = {}
        self.total = 0
        self.started = self.last = 0.0

    def start(self, total: int, backend: str) -> None:
        self.total, self.started = total, time.monotonic()
        print(f"sending {total} message{'s' * (total != 1)} through {backend}", file=self.stream)

    def advance(self, state: str, count: int = 1) -> None:
        self.done += count
        self.counts[state] = self.counts.get(state, 0) + count
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._draw(now)

    def note(self, text: str) -> None:
        self._clear()
        print(text, file=self.stream)

    def finish(self) -> None:
        if self.done:
            self._draw(time.monotonic())
            if self.tty:
                print(file=self.stream)

    def _clear(self) -> None:
        if self.tty:
            print("\r\x1b[K", end="", file=self.stream)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        total = max(self.total, self.done)
        left = (total - self.done) / rate if rate else 0
        width = 24
        filled = int(width * self.done / total) if total else width
        bar = "#" * filled + "-" * (width - filled)
        states = " ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        line = (f"[{bar}] {self.done}/{total} {rate:,.0f}/s ETA {int(left) // 60}:{int(left) % 60:02d}"
                f"  {states}")
        if self.tty:
            print("\r\x1b[K" + line, end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)
