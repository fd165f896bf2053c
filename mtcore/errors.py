"""User errors: bad input that the CLI reports as one line and a non-zero exit, never a traceback."""

import math


class MtcoreError(Exception):
    """An error in what the user gave us (a path, a file, a config), with what to do about it."""


def check_ranges(obj, rules: dict) -> None:
    """rules: {field: (predicate, "the allowed range")}. The first field of `obj` whose value fails its
    predicate (or is a NaN or infinite float) is a one-line error naming the option and the range."""
    for name, (ok, allowed) in rules.items():
        value = getattr(obj, name)
        if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            raise MtcoreError(f"--{name.replace('_', '-')} {value!r}: must be {allowed}")
