"""The one exception type for mistakes a user can make.

Every error a person can cause (a wrong path, an unreadable image, a checkpoint for another
architecture, a threshold out of range) raises :class:`CfdebugError` with a message that says
what was expected, what was found and what to do. The CLI prints the message and exits 2; the
dashboard shows it with ``st.error``. Programming errors stay ordinary exceptions.
"""


class CfdebugError(Exception):
    """A user-facing error: the message is shown as is, without a traceback."""


def expect(condition: bool, message: str) -> None:
    """Raise :class:`CfdebugError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CfdebugError(message)
