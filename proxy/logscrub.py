"""Keeps real secrets out of every log line, whoever writes it.

egress-guard's own code never logs a secret, but mitmproxy's does log wire bytes ("Bad HTTP
response line: b'…'"), and a hostile upstream can put the secret it was just sent into
them. `LOG_SCRUBBER` masks every form of every secret egress-guard has injected in each log
record as it is made — message, arguments and exception text — before any handler sees it.
It is a log-record factory, not a handler filter, so it covers every handler and logger,
the test suite's and the operator's alike.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from egress_guard.forms import SecretForms


class LogScrubber:
    def __init__(self) -> None:
        self._forms: dict[str, SecretForms] = {}  # a name (the service) -> its secret's forms
        self._lock = threading.Lock()
        self._installed: Any = None
        self._users = 0

    def remember(self, name: str, forms: SecretForms) -> None:
        """Mask `forms` from now on. A rotated secret is added, not swapped in: the old one in
        a log line is still a secret."""
        with self._lock:
            self._forms[f"{name}#{id(forms)}"] = forms

    def scrub(self, text: str) -> str:
        if not self._forms:
            return text
        data = text.encode("utf-8", "surrogateescape")
        out = data
        for forms in list(self._forms.values()):
            out = forms.scrub(out)
        return text if out is data else out.decode("utf-8", "surrogateescape")

    def install(self) -> None:
        """Start scrubbing log records (idempotent; one per process, counted)."""
        with self._lock:
            self._users += 1
            if self._installed is not None:
                return
            previous = logging.getLogRecordFactory()
            self._installed = previous

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                if self._forms:
                    self._scrub_record(record)
                return record

            logging.setLogRecordFactory(factory)

    def uninstall(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users or self._installed is None:
                return
            logging.setLogRecordFactory(self._installed)
            self._installed = None

    def _scrub_record(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a broken format: leave it to logging's own error report
            return
        clean = self.scrub(message)
        if clean is not message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)


LOG_SCRUBBER = LogScrubber()
