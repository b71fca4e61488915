"""One progress display for every slow command: a tqdm bar on a terminal, a plain line every few
seconds in a log (no TTY), so a job log shows signs of life without being flooded."""

from __future__ import annotations

import os
import sys
import time

LOG_EVERY_S = float(os.environ.get("MOEBENCH_PROGRESS_EVERY_S", "30"))


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class Progress:
    """``update(n)`` as work completes, ``note(text)`` for a short status (e.g. the loss), ``close()``.

    On a TTY: a tqdm bar redrawn at most twice a second. Otherwise: a line when it starts, then at
    most one every ``every_s`` seconds (default 30, env ``MOEBENCH_PROGRESS_EVERY_S``), and one at the
    end, each ``desc: n/total (pct) elapsed, eta, note``."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        initial: int = 0,
        every_s: float | None = None,
        file=None,
        tty: bool | None = None,
        unit: str = "it",
    ):
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.file = file or sys.stderr
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self.text = ""
        self.start = self.last = time.monotonic()
        self.initial = initial
        tty = bool(getattr(self.file, "isatty", lambda: False)()) if tty is None else tty
        self.bar = None
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                file=self.file,
                mininterval=0.5,
                dynamic_ncols=True,
                unit=unit,
                leave=True,
            )
        else:
            self._line("started")
        self.closed = False

    def _line(self, when: str = "") -> None:
        elapsed = time.monotonic() - self.start
        parts = [f"{self.n}/{self.total}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{_eta(elapsed)} elapsed")
        done = self.n - self.initial
        if self.total and 0 < done and self.n < self.total:
            parts.append(f"eta {_eta(elapsed / done * (self.total - self.n))}")
        if self.text:
            parts.append(self.text)
        if when:
            parts.append(when)
        print(f"{self.desc}: " + ", ".join(parts), file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self._line()

    def note(self, text: str) -> None:
        self.text = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self, when: str = "finished") -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(when)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close("stopped" if exc[0] is not None else "finished")
