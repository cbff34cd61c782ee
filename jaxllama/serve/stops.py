"""Stop strings matched across token boundaries, without leaking any part of one."""

from __future__ import annotations


class StopMatcher:
    """Fed text as it is decoded, returns only text that cannot be part of a stop string.

    `push(text)` returns (safe text, hit): safe text is everything up to the stop string
    completed first, or, while none has matched, everything except a tail that could still become
    the start of one (held back until the next push settles it). `hit` is the stop string
    matched (the text returned then ends before it), or None. `flush()` gives the held
    tail back once the stream ended without a match.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.hit: str | None = None

    def push(self, text: str) -> tuple[str, str | None]:
        if self.hit is not None:
            return "", self.hit
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf, None
        # The stop string completed first (as if the text came one character at a time),
        # and of those ending there the longest: the result does not depend on how the
        # text was split into pieces.
        first = None
        for stop in self.stops:
            at = buf.find(stop)
            if at >= 0:
                key = (at + len(stop), at)
                if first is None or key < first[0]:
                    first = (key, stop)
        if first is not None:
            self._held = ""
            self.hit = first[1]
            return buf[: first[0][1]], self.hit
        # The longest tail of buf that is a proper prefix of some stop string.
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.hit is not None else held
