"""Errors that leak nothing: the coordinator learns a code, a generic reason and a reference id.

When a ClientApp raises, Flower sends the exception's text to the coordinator, which logs it and
keeps it in ``summary.json``. A hospital's exceptions hold what must not leave it: absolute paths
(``/data/PATIENT_DOE/...``), manifest cell text, file names made of patient names. So the hospital
ClientApp catches every exception itself (:mod:`medflower.client.hospital`) and turns it into
:func:`contain`'s reply::

    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
          reason="data-error: the site's data could not be read (ref 7f3a2c91)")

The reason is always ``<code>: <generic reason> (ref <id>)``, from the fixed table
:data:`ERROR_CLASSES`, never from the exception. The full error (type, message, traceback) stays at
the site under the same reference id: in its Python log (logger ``medflower.site``, which a
SuperNode prints), in ``<state>/errors.log`` when the node has a state folder (readable by the
hospital only), and the audit log's entry of the reply records the code and the id. A hospital's
operator asked about ``ref 7f3a2c91`` finds the cause with ``grep 7f3a2c91 <state>/errors.log``.

The simulation's ClientApp does not contain its errors: a researcher's simulated sites hold the
researcher's own data, and the full traceback is what they need to fix a run.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from medflower.data.base import DataError
from medflower.schema import ConfigError

SITE_LOGGER = logging.getLogger("medflower.site")  # the site's own log: full errors, never sent
ERRORS_FILE = "errors.log"
ERROR_CODE = ErrorCode.CLIENT_APP_RAISED_EXCEPTION  # Flower's code for every contained error


class AuditError(RuntimeError):
    """The audit log cannot be written or continued: the node does no work and sends no weights."""


class MessageError(ValueError):
    """The coordinator's message cannot be read (a missing or malformed record, an invalid experiment)."""


@dataclass(frozen=True)
class ErrorClass:
    code: str
    reason: str  # generic: the same for every error of the class


DATA_ERROR = ErrorClass("data-error", "the site's data could not be read")
CONFIG_ERROR = ErrorClass("config-error", "the site's configuration does not fit this experiment")
MESSAGE_ERROR = ErrorClass("message-error", "the site could not read the coordinator's message")
DIVERGED = ErrorClass("training-diverged", "local training diverged")
OUT_OF_MEMORY = ErrorClass("out-of-memory", "the site ran out of memory")
AUDIT_ERROR = ErrorClass("audit-error", "the site could not write its audit log, so it sent nothing")
INTERNAL_ERROR = ErrorClass("internal-error", "the site failed while handling the message")

# Third-party readers whose exceptions mean "a file could not be decoded" (checked by module name,
# so that none of them is imported here).
_READER_MODULES = ("PIL", "nibabel", "pydicom", "SimpleITK", "imageio")

ERROR_CLASSES: tuple[ErrorClass, ...] = (
    DATA_ERROR,
    CONFIG_ERROR,
    MESSAGE_ERROR,
    DIVERGED,
    OUT_OF_MEMORY,
    AUDIT_ERROR,
    INTERNAL_ERROR,
)


def classify(err: BaseException) -> ErrorClass:
    """The class of ``err``; only its type is looked at, never its text."""
    if isinstance(err, AuditError):
        return AUDIT_ERROR
    if isinstance(err, MessageError):
        return MESSAGE_ERROR
    if isinstance(err, DataError):
        return DATA_ERROR
    if isinstance(err, ConfigError):
        return CONFIG_ERROR
    if isinstance(err, FloatingPointError):
        return DIVERGED
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return OUT_OF_MEMORY
    if isinstance(err, (OSError, EOFError)) or type(err).__module__.split(".")[0] in _READER_MODULES:
        return DATA_ERROR
    return INTERNAL_ERROR


@dataclass(frozen=True)
class Contained:
    """A contained error: what the coordinator gets (``reply``) and what the audit log records."""

    code: str
    ref: str
    reply: Message


def new_ref() -> str:
    return secrets.token_hex(4)


def _write_errors_file(state_dir: Path, text: str) -> None:
    path = Path(state_dir) / ERRORS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # the hospital's eyes only
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(text)


def contain(
    err: BaseException,
    msg: Message,
    *,
    where: str,
    state_dir: Path | None = None,
    cls: ErrorClass | None = None,
) -> Contained:
    """Log ``err`` in full at the site under a new reference id; the reply names only its class and the id.

    ``where`` says what the site was doing (``run 3 round 2 train``: no data in it). Writing the
    site's own record never raises: a failure to write ``errors.log`` is logged and the reply still goes.
    """
    cls = cls or classify(err)
    ref = new_ref()
    SITE_LOGGER.error(
        "ref %s: %s while handling %s: %s: %s", ref, cls.code, where, type(err).__name__, err, exc_info=err
    )
    if state_dir is not None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        detail = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        try:
            _write_errors_file(state_dir, f"=== ref {ref} {stamp} {cls.code} ({where})\n{detail}\n")
        except OSError as write_err:
            SITE_LOGGER.error("ref %s: could not append to %s: %s", ref, Path(state_dir) / ERRORS_FILE, write_err)
    reply = Message(Error(code=ERROR_CODE, reason=f"{cls.code}: {cls.reason} (ref {ref})"), reply_to=msg)
    return Contained(cls.code, ref, reply)
