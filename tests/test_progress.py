"""Progress off a terminal: lines with elapsed time and ETA at a steady rate; tqdm on one."""
from __future__ import annotations

import io
import time

from obliviate.progress import LineProgress, format_seconds, progress_bar, write_line


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_the_line_has_count_elapsed_eta_and_rate():
    clock, out = FakeClock(), io.StringIO()
    bar = LineProgress(total=40, desc="relearn (erased)", unit="paragraph", file=out, interval=0, clock=clock)
    clock.now += 120
    bar.update(12)
    bar.set_postfix(epoch=2, loss="1.234")
    assert bar.line() == ("12/40 paragraph (30%), elapsed 2m00s, ETA 4m40s, 0.1 paragraph/s, epoch=2, loss=1.234")
    bar.close()
    bar.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert lines == ["relearn (erased): started (40 paragraph)",
                     "relearn (erased): done, 12 paragraph in 2m00s (epoch=2, loss=1.234)"]


def test_a_resumed_run_counts_its_own_pace():
    clock = FakeClock()
    bar = LineProgress(total=100, initial=50, file=io.StringIO(), interval=0, clock=clock)
    assert "ETA unknown" in bar.line()
    clock.now += 10
    bar.update(10)  # 10 steps in 10 s: 40 left -> 40 s, not (50 + 10) / 10 s
    assert "60/100 it (60%)" in bar.line() and "ETA 40s" in bar.line() and "1 it/s" in bar.line()


def test_lines_come_at_a_steady_rate_even_without_updates_and_stop_when_closed():
    out = io.StringIO()
    bar = progress_bar(total=3, desc="grid", file=out, interval=0.05)
    assert isinstance(bar, LineProgress)
    time.sleep(0.4)  # no update at all: a long step still reports
    bar.close()
    lines = out.getvalue().splitlines()
    ticks = [line for line in lines if "elapsed" in line]
    assert len(ticks) >= 3 and all(line.startswith("grid: 0/3 it (0%)") for line in ticks)
    assert lines[-1].startswith("grid: done, 0 it in")
    count = len(out.getvalue())
    time.sleep(0.15)
    assert len(out.getvalue()) == count  # the timer stopped


def test_a_bar_dropped_without_close_stops_its_timer():
    import gc

    out = io.StringIO()
    bar = progress_bar(total=3, desc="lost", file=out, interval=0.05)
    timer = bar._timer
    del bar  # e.g. an exception left the loop before close()
    gc.collect()
    timer.join(timeout=2)
    assert not timer.is_alive()


def test_iterating_wraps_like_tqdm():
    out = io.StringIO()
    assert list(progress_bar(range(5), desc="items", file=out, interval=0)) == [0, 1, 2, 3, 4]
    assert out.getvalue().splitlines()[0] == "items: started (5 it)"
    assert out.getvalue().splitlines()[-1].startswith("items: done, 5 it in")
    with progress_bar(total=2, file=out, interval=0) as bar:
        bar.update()
    assert bar.closed


def test_on_a_terminal_it_is_tqdm_and_disable_is_silent(monkeypatch):
    from tqdm.auto import tqdm

    terminal = Terminal()
    bar = progress_bar(total=3, desc="x", file=terminal)
    assert isinstance(bar, tqdm)
    bar.close()
    quiet = io.StringIO()
    silent = progress_bar(total=3, file=quiet, disable=True)
    silent.update(3)
    silent.close()
    assert quiet.getvalue() == ""
    monkeypatch.setenv("OBLIVIATE_PROGRESS_INTERVAL", "7")
    bar = progress_bar(total=3, file=io.StringIO(), disable=None)  # tqdm's "auto": lines off a terminal
    assert isinstance(bar, LineProgress) and bar.interval == 7.0
    bar.close()


def test_write_line_and_format_seconds():
    out = io.StringIO()
    write_line("plan: 3 steps", file=out)
    assert out.getvalue() == "plan: 3 steps\n"
    assert [format_seconds(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m05s"]
