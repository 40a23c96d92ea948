"""Where a stored XCR report lives: its kind and cache key (read by the report and by the
estimate, which costs a stored report nothing)."""

from __future__ import annotations

from ..config import XCRConfig, config_dict
from ..store import stable_hash

__all__ = ["REPORT_KIND", "REPORT_FORMAT", "report_key"]

REPORT_KIND = "xcr-report"
REPORT_FORMAT = "xcr-report-v2"


def report_key(ws, config: XCRConfig) -> str:
    """Cache key of a report: the workspace's inputs, the config and the report format."""
    return stable_hash(REPORT_KIND, REPORT_FORMAT, ws.key_parts, config_dict(config))
