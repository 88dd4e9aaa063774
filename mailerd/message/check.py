"""Checks of a campaign's message parts that need no list and no daemon.

Run by the daemon at enqueue and test-send, and by mailerctl (preview, test-send)
so that errors show before any connection. Pure: no socket, no SQL.
"""

from __future__ import annotations

from email.utils import parseaddr

from mailerd.message.addresses import check_address
from mailerd.message.render import (RenderError, Renderer, TemplateError, header_name_problem,
                                    list_unsubscribe_value)
from mailerd.message.signing import DkimKeyError, Signer
from mailerd.schema.control import CampaignSpec

MAX_ATTACHMENT_BYTES = 40 * 1024 * 1024  # all of a campaign's attachments together


class SpecError(ValueError):
    """The campaign cannot be taken; the message names the field."""


def check_message_parts(spec: CampaignSpec) -> None:
    """Everything but the list: reply_to, headers, list_unsubscribe, dkim, attachments.
    Also run by mailerctl (preview, test-send) so errors show before any connection."""
    if spec.reply_to is not None:
        address = parseaddr(spec.reply_to)[1]
        if not address or not check_address(address).ok or any(c in spec.reply_to for c in "\r\n"):
            raise SpecError(f"reply_to: {spec.reply_to!r} is not a valid address")
    for name, value in spec.headers.items():
        problem = header_name_problem(name)
        if problem is not None:
            raise SpecError(f"headers: {problem}")
        if any(c in value for c in "\r\n\x00"):
            raise SpecError(f"headers.{name}: must be a single line")
    unsubscribe = spec.list_unsubscribe
    if unsubscribe is not None:
        if not unsubscribe.mailto and not unsubscribe.url:
            raise SpecError("list_unsubscribe: give mailto, url or both")
        if unsubscribe.url and not unsubscribe.url.lower().startswith("https://"):
            raise SpecError("list_unsubscribe.url: must be an https:// URL (RFC 8058 one-click)")
        if unsubscribe.mailto and "{" not in unsubscribe.mailto:
            address = unsubscribe.mailto.removeprefix("mailto:").partition("?")[0]
            if not check_address(address).ok:
                raise SpecError(f"list_unsubscribe.mailto: {unsubscribe.mailto!r} is not a valid address")
        try:
            list_unsubscribe_value(
                unsubscribe.mailto if unsubscribe.mailto and "{" not in unsubscribe.mailto else None,
                unsubscribe.url if unsubscribe.url and "{" not in unsubscribe.url else None)
        except RenderError as exc:
            raise SpecError(str(exc)) from None
    if spec.dkim is not None:
        try:
            Signer(spec.dkim.domain, spec.dkim.selector, spec.dkim.key)
        except DkimKeyError as exc:
            raise SpecError(f"dkim: {exc}") from None
    total = 0
    for i, attachment in enumerate(spec.attachments):
        where = f"attachments[{i}] ({attachment.name!r})"
        if not attachment.name.strip() or any(c in attachment.name for c in "\r\n\x00/"):
            raise SpecError(f"{where}: not a usable file name")
        maintype, _, subtype = attachment.content_type.partition("/")
        if not maintype or not subtype or maintype == "multipart":
            raise SpecError(f"{where}: content type {attachment.content_type!r} is not usable")
        if attachment.size < 0:
            raise SpecError(f"{where}: negative size")
        total += attachment.size
    if total > MAX_ATTACHMENT_BYTES:
        raise SpecError(f"attachments: {total} bytes in all, more than the "
                        f"{MAX_ATTACHMENT_BYTES // (1024 * 1024)} MiB a campaign may carry")
    try:
        Renderer.from_spec(spec, "check")
    except (TemplateError, RenderError) as exc:
        raise SpecError(str(exc)) from None
