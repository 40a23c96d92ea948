"""The one exception type for mistakes a user can make.

Every error a person can cause (a wrong path, an unreadable image, a checkpoint for another
architecture, a threshold out of range) raises :class:`CfdebugError` with a message that says
what was expected, what was found and what to do. The CLI prints the message and exits 2; the
dashboard shows it with ``st.error``. Programming errors stay ordinary exceptions.
"""

import os

#: Linux's limits on a path and on one name in it, in bytes (``PATH_MAX``, ``NAME_MAX``).
PATH_MAX = 4096
NAME_MAX = 255


class CfdebugError(Exception):
    """A user-facing error: the message is shown as is, without a traceback."""


def expect(condition: bool, message: str) -> None:
    """Raise :class:`CfdebugError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CfdebugError(message)


def check_path_length(path, what: str) -> None:
    """Raise :class:`CfdebugError` when ``path`` is longer than a path or one of its names may be
    (the system would refuse it with "File name too long" wherever it is used).

    The message gives the lengths, never the path: a visitor's 20,000-character URL parameter
    is not echoed back.
    """
    encoded = os.fsencode(path)
    longest = max((len(name) for name in encoded.split(b"/")), default=0)
    if len(encoded) >= PATH_MAX or longest > NAME_MAX:
        raise CfdebugError(
            f"Expected {what} to be a path of fewer than {PATH_MAX} bytes, each name in it at most {NAME_MAX}, "
            f"but got one of {len(encoded):,} bytes (its longest name {longest:,}). Pass a shorter path."
        )
