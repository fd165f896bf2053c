"""Progress of a long loop where the user looks: a bar on a terminal, log lines in a log file.

    with Progress(len(prompts), "iteration 1 sample", "prompts", log_every=30) as progress:
        ...
        progress.update(4, tokens=512)            # 4 more prompts done, 512 more tokens sampled
        progress.update(1, loss=0.61, accuracy=0.75)

It shows the count done of the total, the rate, the time left, tokens/s (when tokens are counted) and
the named numbers last given. The rate and the time left wait for the first item done; where an item
takes at most `item_tokens` tokens (a sampled response, max_new_tokens), the time left is at most what
the tokens still possible take at the tokens/s so far, so a sampler whose requests all finish together
near the end is not given hours left after its first short response. When stderr is a terminal it
redraws one bar line; otherwise it logs a line every `log_every` seconds (as tqdm's mininterval does in
cluster logs; 0: at every counted item) and one at the end. Under torchrun rank 0 alone shows it.
"""

import logging
import shutil
import sys
import time

log = logging.getLogger(__name__)

LOG_EVERY = 30.0  # seconds between log lines when stderr is not a terminal
REDRAW_EVERY = 0.1  # seconds between redraws of a terminal bar
BAR_WIDTH = 24


def duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _rate(value: float) -> str:
    """1,940 or 7.56 or 0.5."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """Count done of total, a rate, the time left, tokens/s and named numbers; see the module's doc.

    initial: items done before this process (a resumed stage's), not counted in the rate.
    item_tokens: the most tokens one item takes (0: unknown), which bounds the time left.
    leave: False for a bar inside another loop: no end line, and the bar is wiped when done.
    clock and tty are for tests (a fake clock; a terminal or not, default: stderr.isatty())."""

    def __init__(self, total: float, desc: str, unit: str = "it", initial: float = 0, log_every: float = LOG_EVERY,
                 leave: bool = True, clock=time.monotonic, tty: bool | None = None, stream=None,
                 item_tokens: int = 0):
        from mtcore import parallel

        self.total, self.desc, self.unit, self.leave, self.clock = total, desc, unit, leave, clock
        self.item_tokens = item_tokens
        self.done = self.initial = initial
        self.tokens, self.numbers = 0, {}
        self.log_every = LOG_EVERY if log_every is None else log_every
        self.stream = sys.stderr if stream is None else stream
        self.shown = parallel.is_main()
        self.tty = self.shown and (self.stream.isatty() if tty is None else tty)
        self.start = self.last_shown = clock()
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: float = 1, tokens: int = 0, **numbers) -> None:
        """n more items done, `tokens` more tokens processed; numbers: the latest loss, accuracy, ..."""
        self.done += n
        self.tokens += tokens
        self.numbers.update(numbers)
        if not self.shown:
            return
        now = self.clock()
        if self.tty:
            if now - self.last_shown >= REDRAW_EVERY:
                self.last_shown = now
                self._draw()
        elif now - self.last_shown >= self.log_every and (n or self.log_every > 0):  # 0: per item, not per token
            self.last_shown = now
            log.info("%s", self.line())

    def resume(self, n: float) -> None:
        """n items found done by an earlier run: counted, but not in the rate."""
        self.done += n
        self.initial += n

    def update_to(self, done: float, tokens: int = 0, **numbers) -> None:
        """Set the count to `done` (e.g. the exact count at a sync point, after estimates)."""
        self.update(done - self.done, tokens, **numbers)

    def elapsed(self) -> float:
        return self.clock() - self.start

    def rate(self) -> float:
        """Items a second since the start, the resumed ones left out."""
        elapsed = self.elapsed()
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def tokens_per_s(self) -> float:
        elapsed = self.elapsed()
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def time_left(self) -> float | None:
        """Seconds to the total at the rate so far, at most the tokens still possible at the tokens/s so
        far (item_tokens); None before either is known."""
        rate, tokens_per_s = self.rate(), self.tokens_per_s()
        left = [max(0.0, self.total - self.done) / rate] if rate > 0 else []
        if self.item_tokens and tokens_per_s > 0:
            left.append(max(0.0, (self.total - self.initial) * self.item_tokens - self.tokens) / tokens_per_s)
        return min(left) if left else None

    def line(self, final: bool = False) -> str:
        """`desc: 12/40 steps (30%), 1.5 steps/s, 19s left, 2,310 tokens/s, loss 0.6131` (at the end:
        `desc: 40/40 steps in 27s, ...`)."""
        done = int(self.done + 1e-9)
        parts = [f"{done}/{int(self.total)} {self.unit}"]
        if final:
            parts[0] += f" in {duration(self.elapsed())}"
        elif self.total:
            parts[0] += f" ({100 * min(1.0, self.done / self.total):.0f}%)"
        if self.done > self.initial:  # no "0 responses/s" before the first one is done
            parts.append(f"{_rate(self.rate())} {self.unit}/s")
        left = self.time_left()
        if not final and left is not None:
            parts.append(f"{duration(left)} left")
        if self.tokens:
            parts.append(f"{self.tokens_per_s():,.0f} tokens/s")
        parts += [f"{k} {_number(v)}" for k, v in self.numbers.items()]
        return f"{self.desc}: " + ", ".join(parts)

    def _draw(self, end: str = "") -> None:
        frac = min(1.0, self.done / self.total) if self.total else 0.0
        filled = int(frac * BAR_WIDTH)
        text = f"{self.desc} |{'#' * filled}{'-' * (BAR_WIDTH - filled)}| " + self.line(bool(end))[len(self.desc) + 2:]
        width = shutil.get_terminal_size((120, 20)).columns - 1
        self.stream.write("\r" + text[:width].ljust(width) + end)
        self.stream.flush()

    def close(self) -> None:
        """The end line (leave), or a wiped bar; once."""
        if self.closed or not self.shown:
            self.closed = True
            return
        self.closed = True
        if self.tty:
            if self.leave:
                self._draw(end="\n")
            else:
                width = shutil.get_terminal_size((120, 20)).columns - 1
                self.stream.write("\r" + " " * width + "\r")
                self.stream.flush()
        elif self.leave:
            log.info("%s", self.line(final=True))
