"""virt-vmstate's one log: syslog for the hook and the proxy, stderr for the command line.

Every module logs through ``log``.  It is not the ``logging`` package: the
hook runs for every event of every domain, and importing ``logging`` costs it
more than all of its own work.  Until configured, warnings and errors go to
stderr, as ``logging`` does.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .core.config import HostConfig

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}
_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}


class Log:
    """Records at or above ``level`` go to syslog and/or stderr, each prefixed with ``context``."""

    def __init__(self) -> None:
        self.level = WARNING
        self.syslog = False
        self.stderr = True
        self.stderr_format = "virt-vmstate: {message}"
        self.context = ""

    def debug(self, message: str, *args: object) -> None:
        self._emit(DEBUG, message, args)

    def info(self, message: str, *args: object) -> None:
        self._emit(INFO, message, args)

    def warning(self, message: str, *args: object) -> None:
        self._emit(WARNING, message, args)

    def error(self, message: str, *args: object) -> None:
        self._emit(ERROR, message, args)

    def exception(self, message: str, *args: object) -> None:
        """An error with the traceback of the exception being handled (stderr only)."""
        import traceback
        self._emit(ERROR, message, args, traceback.format_exc().rstrip())

    def _emit(self, level: int, message: str, args: tuple[object, ...], detail: str = "") -> None:
        if level < self.level:
            return
        text = message % args if args else message
        if self.context:
            text = f"{self.context}: {text}"
        if self.syslog:
            import syslog
            priority = {DEBUG: syslog.LOG_DEBUG, INFO: syslog.LOG_INFO,
                        WARNING: syslog.LOG_WARNING, ERROR: syslog.LOG_ERR}[level]
            syslog.syslog(priority, text)
        if self.stderr:
            line = self.stderr_format.format(message=text, level=_NAMES[level],
                                             time=time.strftime("%Y-%m-%d %H:%M:%S"))
            sys.stderr.write(f"{line}\n{detail}\n" if detail else line + "\n")
            sys.stderr.flush()


log = Log()


def setup_logging(config: HostConfig, ident: str = "virt-vmstate", *, stderr: bool = False) -> None:
    """The hook and the proxy: the configured level to syslog (daemon facility), and to
    stderr with a timestamp if asked (the proxy's stderr is its log file)."""
    log.level = LEVELS[config.logging.level]
    log.syslog = config.logging.syslog and os.path.exists("/dev/log")
    if log.syslog:
        import syslog
        syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_DAEMON)
    log.stderr = stderr
    log.stderr_format = "{time} {level} {message}"


def log_to_stderr(verbose: bool) -> None:
    """The command line: warnings (with ``verbose``, everything) to stderr."""
    log.level = DEBUG if verbose else WARNING
    log.stderr = True
    log.stderr_format = "virt-vmstate: {message}"
