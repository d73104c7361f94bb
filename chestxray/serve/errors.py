"""The one error type a user reads, and the handler wrapper that turns every failure into one line of it.

Every front end shows :class:`ServiceError`'s text as it is (the Gradio page as ``gr.Error``, the HTTP API as
``{"error": ...}`` with :attr:`ServiceError.status`); nothing else, and never a traceback, reaches a user.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from chestxray.imaging import ImageReadError
from chestxray.layout import CheckpointError
from chestxray.serve import runtime
from chestxray.serve.limits import SLOTS

log = logging.getLogger("chestxray.serve")
F = TypeVar("F", bound=Callable[..., Any])

#: What the user reads when something unforeseen fails (the traceback goes to the server's log).
UNEXPECTED = "Unexpected error while processing the request (details are in the server log)."
#: The HTTP status of an unreadable file, by the start of the reader's message (ImageReadError has one type):
#: not an image at all, or a compression nothing here decodes -> 415; over the size limits -> 413; an image
#: that is damaged, empty or blank -> 422 (the default).
READ_STATUS = {"not a readable image": 415, "unsupported DICOM compression": 415, "image too large": 413,
               "file too large": 413}


class ServiceError(Exception):
    """A one-line message for the user; ``status`` is its HTTP status (4xx: the request's fault)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(one_line(message))
        self.status = status


def one_line(text: object) -> str:
    """The first line of ``text`` (an exception: its message, else its type's name), never empty."""
    lines = str(text).strip().splitlines()
    return lines[0].strip() if lines else type(text).__name__ if isinstance(text, BaseException) else "error"


def as_service_error(err: Exception, where: str = "a handler") -> ServiceError:
    """Any exception as the one line a user may read (unforeseen ones are logged with their traceback)."""
    if isinstance(err, ServiceError):
        return err
    if isinstance(err, ImageReadError):
        text = one_line(err)
        return ServiceError(text, next((s for p, s in READ_STATUS.items() if text.startswith(p)), 422))
    if isinstance(err, CheckpointError):  # an installed model that does not load: the server's fault
        return ServiceError(one_line(err), 500)
    if isinstance(err, ValueError):
        return ServiceError(one_line(err))
    log.error("unexpected error in %s", where, exc_info=err)
    return ServiceError(UNEXPECTED, 500)


def guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with every failure as :class:`ServiceError` and the request's freed heap handed
    back to the OS afterwards."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line
        raise as_service_error(err, getattr(fn, "__name__", "a handler")) from None
    finally:
        runtime.trim_heap()


def user_errors(fn: F | None = None, *, model: bool = False) -> F:
    """Runs a handler :func:`guarded` on a work thread (:mod:`chestxray.serve.runtime`); with ``model=True`` it
    first sets torch's threads (a request may come before the warm-up thread) and waits for a model slot
    (:data:`~chestxray.serve.limits.SLOTS`), outside the work threads.

    A handler called from another one (already on a work thread) runs directly: the outer one holds the slot
    and reports the errors, and it does not wait for a free thread."""
    if fn is None:
        return functools.partial(user_errors, model=model)  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if runtime.on_work_thread():
            return fn(*args, **kwargs)
        if model:
            runtime.configure_torch()
        with SLOTS.hold() if model else contextlib.nullcontext():
            return runtime.submit(guarded, fn, *args, **kwargs).result()

    return wrapper  # type: ignore[return-value]
