"""What the command line sets up around a run, and puts back when it returns: progress lines on stderr, warning
filters, transformers' verbosity and progress bars, and SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator

EXIT_TERMINATED = 143


@contextlib.contextmanager
def output_configured(*, verbose: bool, quiet: bool) -> Iterator[None]:
    """Progress lines from the library's loggers on stderr, progress bars when stderr is a terminal (not with -q);
    third-party advice only with -v. Everything it sets is put back on exit."""
    import warnings

    import transformers

    hf_logging = transformers.utils.logging
    start = time.monotonic()

    class _Elapsed(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"[{time.monotonic() - start:6.1f}s] {record.getMessage()}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Elapsed())
    library = logging.getLogger("safemerge")
    handlers, level, propagate = library.handlers[:], library.level, library.propagate
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    library.handlers[:] = [handler]
    library.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    library.propagate = False
    with warnings.catch_warnings():
        if not verbose:
            warnings.filterwarnings("ignore", module=r"(peft|transformers|accelerate)(\.|$)")
            hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        # transformers' switch drives its bars, PEFT's merge bar and safemerge's: on where a person watches.
        if sys.stderr.isatty() and not quiet:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
        else:
            hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        try:
            yield
        finally:
            library.handlers[:] = handlers
            library.setLevel(level)
            library.propagate = propagate
            hf_logging.set_verbosity(verbosity)
            (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the library's cleanup and restore run (kill -9 leaves what the next run
    recognises as stale and removes); the previous handler is put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def terminate(signum: int, frame: object) -> None:
    raise SystemExit(EXIT_TERMINATED)
