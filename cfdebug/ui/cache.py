"""The dashboard's one cache of computed objects: :func:`memo`.

What it keeps: objects a page computed from the on-disk artifacts (the open workspace, a
detection report, Grad-CAM maps, filter regions), under explicit keys built from the
workspace's key (:func:`cfdebug.ui.filters.ws_key`), process-wide, so every browser session
shares them. The heavy artifacts themselves are cached on disk by the library; this only keeps
what was loaded or derived in memory.

Why this and not ``st.cache_data``/``st.cache_resource`` (the dashboard used both, keying the
same things twice): Streamlit's caches hash every argument (a workspace cannot be hashed, so it
was passed as an unhashed ``_ws`` beside a hand-made key anyway), ``cache_data`` pickles and
copies the value on every hit (a whole split's Grad-CAM maps), and both replay the elements a
cached function draws, which breaks a progress bar created outside it. :func:`memo` takes the
key it is given, hands back the stored object itself, and lets a computation report progress.
The price: callers must not mutate what it returns.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable

__all__ = ["memo"]

_MEMOS: dict[Hashable, OrderedDict] = {}
_LOCK = threading.Lock()


def memo(key: tuple, compute: Callable[[], Any], max_entries: int = 16) -> Any:
    """``compute()``'s value under ``key``, computed once per process.

    ``key[0]`` names what is kept (``"workspace"``, ``"gradcam"``, …): each name keeps its own
    ``max_entries`` most recently used values, so a kind of object with few, large entries (open
    workspaces) never evicts another's. Two sessions missing the same key at once may both
    compute it; the value is the same.
    """
    with _LOCK:
        entries = _MEMOS.setdefault(key[0], OrderedDict())
        if key in entries:
            entries.move_to_end(key)
            return entries[key]
    value = compute()
    with _LOCK:
        entries[key] = value
        while len(entries) > max_entries:
            entries.popitem(last=False)
    return value
