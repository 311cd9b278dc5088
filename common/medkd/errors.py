"""Readable failures of ``python -m monai.bundle run``: the real error as the first and the last line.

MONAI's config parser wraps an exception raised while evaluating a config item in ``RuntimeError: Failed to
evaluate ConfigExpression`` (sometimes several times), and Ignite logs an exception raised during a run with its
traceback before re-raising it, so a failing run printed the same error several times and ended with the wrapper.
:func:`install_excepthook` (installed when ``medkd`` is imported by ``python -m monai.bundle`` or ``python -m medkd``)
prints instead::

    ERROR: <the real error, one line: type, message naming the file or key>
    <the real error's traceback; the whole chain with MEDKD_TRACEBACK=full>
    ERROR: <the same line>

The real error is the first exception of the chain (outermost first) raised from ``medkd`` code (our messages name
the file or key and say what to do); without one, the innermost exception.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from types import TracebackType

__all__ = ["real_error", "error_line", "install_excepthook"]

_PACKAGE = str(Path(__file__).resolve().parent)


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return out


def _raised_in_medkd(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_PACKAGE)


def real_error(exc: BaseException) -> BaseException:
    """The exception of ``exc``'s chain that says what went wrong (see the module docstring)."""
    chain = _chain(exc)
    return next((e for e in chain if _raised_in_medkd(e)), chain[-1])


def error_line(exc: BaseException) -> str:
    """``"ERROR: <Type>: <message>"`` of :func:`real_error` on one line."""
    err = real_error(exc)
    message = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    message = " ".join(message.split())
    return f"ERROR: {type(err).__name__}: {message}"


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    line = error_line(exc)
    print(line, file=sys.stderr)
    if os.environ.get("MEDKD_TRACEBACK", "").lower() == "full":
        traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
    else:
        err = real_error(exc)
        print("Traceback of the error (set MEDKD_TRACEBACK=full for the whole chain):", file=sys.stderr)
        traceback.print_exception(type(err), err, err.__traceback__, chain=False, file=sys.stderr)
    print(line, file=sys.stderr, flush=True)


def _reraised_record(record: logging.LogRecord) -> bool:
    """Records of an exception that the engine re-raises: Ignite's "... terminating due to exception" and MONAI
    StatsHandler's "Exception: ..." (each with the traceback, once per engine)."""
    msg = str(record.msg)
    return record.levelno >= logging.ERROR and ("terminating due to exception" in msg or msg.startswith("Exception: "))


def _record_factory(factory):
    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        if record.exc_info and _reraised_record(record):  # reported once, by the exception hook
            record.exc_info = None
        return record

    make.medkd = True
    return make


def install_excepthook(force: bool = False) -> bool:
    """Install the hook of the module docstring when this process is ``python -m monai.bundle`` or ``python -m
    medkd`` (or when ``force``), unless another hook than Python's own is installed; returns whether it did."""
    main = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    cli = (main.name == "__main__.py" and main.parent.name == "bundle" and main.parent.parent.name == "monai") or (
        main.name == "__main__.py" and str(main.resolve().parent) == _PACKAGE
    )
    if not (force or cli) or sys.excepthook is not sys.__excepthook__:
        return False
    sys.excepthook = _excepthook
    if not getattr(logging.getLogRecordFactory(), "medkd", False):
        logging.setLogRecordFactory(_record_factory(logging.getLogRecordFactory()))
    return True
