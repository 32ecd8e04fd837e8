"""Progress lines for steps that take minutes: done / total, rate and ETA, at most every N seconds.

A step that reports only when a unit of work ends (a table chunk, a merged chunk) can stay silent
for many minutes on a busy machine (a 10M chunk once took 12.5 min); :class:`Progress` is told of
every small advance and prints a line when ``every`` seconds have passed since the last one, in
:func:`lowshot.common.log`'s format.
"""
import time

from lowshot.common import log


class Progress:
    """Log ``what: done / total unit (rate unit/s, ETA s)`` at most every ``every`` seconds.

    Parameters
    ----------
    what : str, the step, first on the line
    total : float, the amount of work (rows, bytes, ...)
    unit : str, the unit of ``done`` and ``total``
    every : float, seconds between lines (30: a quiet log that still shows a step is alive)
    clock : callable returning seconds (``time.time``; a fake clock in the tests)
    emit : callable taking the line (:func:`lowshot.common.log`)
    """

    def __init__(self, what, total, unit="rows", every=30.0, clock=time.time, emit=log):
        self.what, self.total, self.unit, self.every = what, float(total), unit, every
        self.clock, self.emit = clock, emit
        self.t0 = self.tlast = clock()

    def line(self, done):
        """The progress line for ``done`` units done, rate and ETA from the start."""
        el = max(self.clock() - self.t0, 1e-9)
        rate = done / el
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        return "  %s: %.0f / %.0f %s (%.3g %s/s, ETA %.0f s)" % (
            self.what, done, self.total, self.unit, rate, self.unit, eta)

    def update(self, done):
        """Report ``done`` units done: logs a line when ``every`` seconds passed since the last."""
        now = self.clock()
        if now - self.tlast >= self.every:
            self.tlast = now
            self.emit(self.line(done))
