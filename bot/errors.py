"""The one exception root for everything a user may be told.

Every error here carries a message written for the person who typed the command: it says what was
wrong and what to change. Adapters show `str(error)` as it is; anything that is not an `EaselError`
is a bug and is logged, and the user gets a generic apology instead.
"""


def first_line(error: BaseException) -> str:
    """An error's message cut to its first line (library errors run on), or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class EaselError(Exception):
    """A problem the user (or operator) can fix; the message says how."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidCommand(EaselError):
    """The command text breaks the grammar or a configured limit."""

    code = "invalid_command"


class InvalidImage(EaselError):
    """An attached image or mask cannot be used."""

    code = "invalid_image"


class QuotaExceeded(EaselError):
    """The user has used up a quota window. `retry_after_s`: how long until it lifts enough for this
    job (None when waiting does not help: the job is bigger than the whole window), for the HTTP
    API's Retry-After header."""

    code = "quota_exceeded"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(EaselError):
    """The user (or everyone) already has as many jobs waiting as allowed."""

    code = "queue_full"


class NotFound(EaselError):
    """A job or image id that does not exist, or is not the user's."""

    code = "not_found"


class Refused(EaselError):
    """The request is understood but not allowed (banned user, not the owner, ...)."""

    code = "refused"


class ConfigError(EaselError):
    """The configuration file or environment holds a bad key or value."""

    code = "config_error"


class GenerationFailed(EaselError):
    """The worker could not produce the images; the message says what to lower or retry."""

    code = "generation_failed"


class Unauthorized(EaselError):
    """No credentials, or credentials that match no active API key."""

    code = "unauthorized"


class IdempotencyConflict(EaselError):
    """An Idempotency-Key reused with a different request."""

    code = "idempotency_conflict"
