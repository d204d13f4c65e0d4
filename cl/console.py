"""What the lab says while it works, printed as the command line prints: one line each on
standard error, `cl: ...` (`cl: warning: ...`), through tqdm so progress bars stay whole.

The lab's modules log on the `cl` logger and never print, and so do the strategies, on
the `strategies` logger (a penalty past the optimizer's stability limit warns there); the
`cl` command (and the delivery child it starts) installs this handler on both. From
Python, attach it yourself (`cl.console.install()`) or configure `logging` as you like;
warnings show either way.
"""
from __future__ import annotations

import logging
import sys

from tqdm import tqdm


class ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            tqdm.write(f"cl: {level}{record.getMessage()}", file=sys.stderr)  # the stderr of now: tests swap it
        except Exception:
            self.handleError(record)


def install() -> None:
    """Print the `cl` and `strategies` loggers' INFO and above, once, however often it is called."""
    for name in ("cl", "strategies"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
            logger.addHandler(ConsoleHandler())
        logger.setLevel(logging.INFO)
