"""The enqueue-time check of a list row: would its merge values make an unsafe
message?  It runs the renderer's own header half (Renderer.check_headers) on the
row, so a row it passes never fails at send time for its merge values, and names
the column at fault.  enqueue stores a row it refuses as `invalid` (with
--skip-unsafe) or refuses the campaign.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from email.utils import parseaddr
from typing import NamedTuple

from mailerd.message.addresses import check_address
from mailerd.message.headers import header_value_problem
from mailerd.message.render import (RenderError, Renderer, UnsafeValue, needs_smtputf8,
                                    template_variables)
from mailerd.schema.control import CampaignSpec, Row, email_column_index, merge_field_names

__all__ = ["UNSAFE", "RowCheck", "RowProblem", "row_check_for", "unsafe_rows"]

UNSAFE = "unsafe merge value: "  # how the reason of a row kept invalid for it begins

_CHECK_UID = "enqueue-check"  # only Message-ID and token use it; both are safe for any uid
_CHECK_KEY = b"enqueue-check-key"  # a token has the same form whatever the key


class RowProblem(NamedTuple):
    column: str  # the column at fault (several, comma-separated, if only together)
    why: str

    def __str__(self) -> str:
        return f"column {self.column!r}: {self.why}"


class RowCheck:
    """The check of one campaign's rows (templates compiled once)."""

    def __init__(self, spec: CampaignSpec) -> None:
        self._renderer = Renderer.from_spec(spec, _CHECK_UID, (), _CHECK_KEY)
        self._sender = parseaddr(spec.sender)[1]
        columns = merge_field_names(spec.columns)
        in_headers: set[str] = set()
        for source in _header_templates(spec):
            in_headers |= template_variables(source)
        self._header_columns = [(i, c) for i, c in enumerate(columns) if c in in_headers]

    def problem(self, email: str, fields: list[str]) -> RowProblem | None:
        """Why this row (its address as normalised, its merge values in column order)
        cannot be sent safely, or None."""
        try:
            self._renderer.check_headers(
                email=email, fields=fields, smtputf8=needs_smtputf8(email, self._sender))
        except UnsafeValue as exc:
            return RowProblem(exc.column, exc.why)
        except RenderError as exc:
            return self._culprit(email, fields, str(exc))
        return None

    def _culprit(self, email: str, fields: list[str], error: str) -> RowProblem:
        """The column whose value alone makes a header unsafe, else every column the
        headers read (values that are unsafe only together, e.g. split encoded words)."""
        for index, column in [(-1, "email"), *self._header_columns]:
            if index < len(fields):
                problem = header_value_problem(email if index < 0 else fields[index])
                if problem is not None:
                    return RowProblem(column, f"{problem} (the value goes into a header)")
        columns = ", ".join(c for _, c in self._header_columns) or "email"
        return RowProblem(columns, error)


def unsafe_rows(spec: CampaignSpec, rows: list[Row]) -> dict[int, str]:
    """{line: why} for the rows of a list chunk whose merge values would make an unsafe
    message (rows invalid for other reasons are left to enqueue).  Pure CPU work, about
    25 µs a row (250 µs with non-ASCII header values): run it off the event loop and
    off the journal thread."""
    index = email_column_index(spec.columns)
    if index is None:
        return {}  # refused by check_spec
    row_check = row_check_for(spec)
    found: dict[int, str] = {}
    for row in rows:
        if len(row.values) != len(spec.columns):
            continue
        address = check_address(row.values[index])
        if address.ok:
            problem = row_check.problem(address.address, row.values[:index] + row.values[index + 1:])
            if problem is not None:
                found[row.line] = str(problem)
    return found


def _header_templates(spec: CampaignSpec) -> list[str]:
    sources = [spec.subject, *spec.headers.values()]
    if spec.list_unsubscribe is not None:
        sources += [spec.list_unsubscribe.mailto or "", spec.list_unsubscribe.url or ""]
    return [s for s in sources if s]


# enqueue checks a campaign's rows chunk by chunk: its RowCheck is kept between
# chunks, keyed by the spec object itself (held, so its id cannot be reused).
_CACHED = 8
_cache: OrderedDict[int, tuple[CampaignSpec, RowCheck]] = OrderedDict()
_cache_lock = threading.Lock()


def row_check_for(spec: CampaignSpec) -> RowCheck:
    """The RowCheck of this spec object, built on first use."""
    with _cache_lock:
        hit = _cache.get(id(spec))
        if hit is not None and hit[0] is spec:
            _cache.move_to_end(id(spec))
            return hit[1]
    check = RowCheck(spec)
    with _cache_lock:
        _cache[id(spec)] = (spec, check)
        while len(_cache) > _CACHED:
            _cache.popitem(last=False)
    return check
