"""Progress that stays visible when the output is not a terminal.

tqdm redraws one line with carriage returns; under nohup, in CI logs or in a notebook that
is either silence or a wall of fragments, and a 10-minute relearning attack looks dead.
``progress_bar`` is tqdm on a terminal and, anywhere else, a plain line every ``interval``
seconds (from a timer, so a long step still reports) with the elapsed time and an ETA:

    relearning: 12/40 steps (30%), elapsed 2m05s, ETA 4m52s, 0.10 steps/s

It takes tqdm's arguments and offers the part of its interface our loops use (iteration,
``update``, ``set_postfix``, ``set_description``, ``write``, ``close``, a context manager).
``OBLIVIATE_PROGRESS_INTERVAL`` (seconds, default 30) sets the rate off a terminal.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from typing import Any, Iterable, TextIO

DEFAULT_INTERVAL = 30.0


def progress_bar(iterable: Iterable | None = None, *, desc: str | None = None, total: float | None = None,
                 initial: float = 0, disable: bool | None = False, file: TextIO | None = None,
                 interval: float | None = None, unit: str = "it", **tqdm_kwargs: Any):
    """tqdm when ``file`` (stderr by default) is a terminal, else ``LineProgress``.

    ``disable=True`` is silent; ``None`` and ``False`` both show progress (tqdm's ``None``
    meant "silent off a terminal", the silence this module ends)."""
    stream = file if file is not None else sys.stderr
    if disable or _is_tty(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, initial=initial, disable=bool(disable), file=stream, unit=unit,
                    **tqdm_kwargs)
    if interval is None:
        interval = float(os.environ.get("OBLIVIATE_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
    return LineProgress(iterable, desc=desc, total=total, initial=initial, file=stream, interval=interval, unit=unit)


def write_line(text: str, file: TextIO | None = None) -> None:
    """``tqdm.write`` on a terminal (above a running bar), a plain line elsewhere."""
    stream = file if file is not None else sys.stderr
    if _is_tty(stream):
        from tqdm.auto import tqdm

        tqdm.write(text, file=stream)
    else:
        print(text, file=stream, flush=True)


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class LineProgress:
    """Progress lines at a steady rate: one when it starts, one every ``interval`` seconds
    while it runs (a daemon timer thread), one when it closes."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str | None = None, total: float | None = None,
                 initial: float = 0, file: TextIO | None = None, interval: float = DEFAULT_INTERVAL,
                 unit: str = "it", clock=time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit = iterable, desc or "progress", total, unit
        self.file = file if file is not None else sys.stderr
        self.interval, self.clock = float(interval), clock
        self.n, self.initial, self.postfix, self.closed = initial, initial, "", False
        self.start = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        resumed = f", resumed at {_count(initial)}" if initial else ""
        self._emit("started" + (f" ({_count(total)} {unit}{resumed})" if total is not None else resumed))
        self._timer = None
        if self.interval > 0:
            # The timer holds only a weak reference: a bar dropped without close() (an exception
            # in the loop) is collected, and its timer stops instead of printing forever.
            self._timer = threading.Thread(target=_tick, args=(weakref.ref(self), self._stop, self.interval),
                                           name="obliviate-progress", daemon=True)
            self._timer.start()

    # -- tqdm's interface ---------------------------------------------------------------
    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def write(self, text: str) -> None:
        with self._lock:
            print(text, file=self.file, flush=True)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        self._emit(f"done, {_count(self.n - self.initial)} {self.unit} in {format_seconds(self.clock() - self.start)}"
                   + (f" ({self.postfix})" if self.postfix else ""))

    def __del__(self) -> None:
        self._stop.set()  # never close() from the garbage collector: it may run at interpreter exit

    # -- the lines ----------------------------------------------------------------------
    def line(self) -> str:
        """One progress line: count (and share of the total), elapsed, ETA, rate, postfix."""
        elapsed = self.clock() - self.start
        parts = [f"{_count(self.n)}/{_count(self.total)} {self.unit}" if self.total else f"{_count(self.n)} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if self.n > self.initial and elapsed > 0:
            rate = (self.n - self.initial) / elapsed  # this session's pace, not a resumed run's
            if self.total:
                parts.append(f"ETA {format_seconds(max(0.0, self.total - self.n) / rate)}")
            parts.append(f"{rate:.3g} {self.unit}/s")
        elif self.total:
            parts.append("ETA unknown")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _emit(self, text: str) -> None:
        with self._lock:
            try:
                print(f"{self.desc}: {text}", file=self.file, flush=True)
            except ValueError:  # the stream was closed under us (interpreter exit)
                self._stop.set()


def _tick(ref: "weakref.ref[LineProgress]", stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        bar = ref()
        if bar is None or bar.closed:
            return
        bar._emit(bar.line())
        del bar  # no strong reference between ticks


def _count(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:g}" if isinstance(value, float) and not value.is_integer() else f"{int(value)}"
