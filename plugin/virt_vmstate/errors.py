"""One error tree for everything virt-vmstate raises on purpose.

Every message says what failed and, through ``hint``, what to do next.  Errors
that match a built-in category also inherit it (``BundleError`` is a
``ValueError``, ``HelperTimeout`` a ``TimeoutError``) so callers may catch either.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable


class VMStateError(Exception):
    """Root of the tree: an expected failure with a message for the operator."""

    hint: str = ""
    exit_status = 1  # of the command that reports it

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}; {self.hint}"
        return self.message


class ConfigError(VMStateError, ValueError):
    """The host configuration file is missing, unreadable or invalid."""

    hint = "fix the file and run the operation again"


class DomainXMLError(VMStateError, ValueError):
    """The domain XML, or virt-vmstate's metadata in it, is malformed."""


class BundleError(VMStateError, ValueError):
    """A state bundle failed a check while being decoded or verified."""

    hint = "the state was not used; save it again on the source and retry"


class DeadlineExceeded(VMStateError, TimeoutError):
    """An overall deadline (a hook run, a wait for a process) passed."""


class BusError(VMStateError, ConnectionError):
    """The helper bus could not be reached, or went away."""

    def __init__(self, address: str, what: str, *, hint: str | None = None) -> None:
        super().__init__(f"bus {address}: {what}", hint=hint)
        self.address = address


class HelperError(VMStateError):
    """A failure that belongs to one helper on the bus."""

    def __init__(self, helper_id: str | None, unique_name: str, what: str,
                 *, hint: str | None = None) -> None:
        label = f"helper {helper_id!r} ({unique_name})" if helper_id else f"helper {unique_name}"
        super().__init__(f"{label}: {what}", hint=hint)
        self.helper_id = helper_id
        self.unique_name = unique_name


class HelperCallError(HelperError):
    """The helper answered a call with a D-Bus error."""

    def __init__(self, helper_id: str | None, unique_name: str, method: str,
                 error_name: str, error_message: str) -> None:
        detail = f"{method} failed with {error_name}"
        if error_message:
            detail += f": {error_message}"
        super().__init__(helper_id, unique_name, detail)
        self.error_name = error_name
        self.error_message = error_message


class HelperTimeout(HelperError, TimeoutError):
    """The helper did not answer within the per-call timeout."""

    hint = "check that the helper is alive and not stuck, or raise timeouts.call"


class HelperVanished(HelperError):
    """The helper left the bus before answering."""

    hint = "check the helper's log for a crash"


class HelperUnauthorized(HelperError):
    """The helper's connection belongs to a user the host does not allow."""


class StateTooLarge(HelperError):
    """A helper's state is larger than the configured cap."""

    hint = "raise limits.max_state_size in the host config if this size is expected"


class HelperIdError(VMStateError):
    """A helper Id is empty, too long, or used by more than one helper."""

    hint = "give every helper on the bus a unique Id of 1 to 255 bytes"


class MissingHelpersError(VMStateError):
    """Helpers that must be present (or must have a state record) are not."""

    def __init__(self, what: str, ids: Iterable[str], *, hint: str | None = None) -> None:
        self.ids = sorted(ids)
        super().__init__(f"{what}: {', '.join(self.ids)}", hint=hint)


class RunDirError(VMStateError, OSError):
    """The per-domain runtime directory could not be used."""


class ManagedProcessError(VMStateError):
    """A managed dbus-daemon or helper could not be started or stopped."""


class LibvirtError(VMStateError):
    """A libvirt call made by a command-line operation failed."""


class MigrationInterrupted(VMStateError):
    """The operator interrupted a migration (Ctrl-C), and libvirt aborted it."""

    exit_status = 130
