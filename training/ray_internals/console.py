"""Ray's console output that tells a user nothing to act on, turned off one message at a time
(by the logger of the private Ray module that writes it, hence here). Ray Train's own logging is
set through RunConfig (``training/observability/failures.py``)."""

from __future__ import annotations

import importlib.util
import logging

# Ray 2.60 on every new local cluster: token authentication is on by default (it is; the
# embedded Ray generates its own token). Its warning that authentication is *off* stays.
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_AUTH_ON = "Token authentication is enabled for this Ray cluster"


def quiet_token_auth_notice() -> None:
    logger = logging.getLogger(TOKEN_AUTH_LOGGER)
    if not any(isinstance(f, _DropTokenAuthOn) for f in logger.filters):
        logger.addFilter(_DropTokenAuthOn())


class _DropTokenAuthOn(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_AUTH_ON)


# Ray Train 2.60 logs each ray.train.report on every rank, metrics as a dict (so each report
# shows once per rank), through a logger named by its file path: outside `ray.train`, so
# RunConfig's LoggingConfig does not reach it. The progress lines and the run log say the same.
REPORT_ECHO_MODULE = "ray.train.v2._internal.execution.context"


def quiet_report_echo() -> None:
    """In a Ray Train worker: its report echo only for warnings and errors."""
    spec = importlib.util.find_spec(REPORT_ECHO_MODULE)
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
