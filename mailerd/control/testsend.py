"""`mailerctl test-send`: one message, rendered as a campaign's would be, sent
through the first server the campaign may use (its `servers`, else the config's
first) over a short-lived SMTP session of the daemon's own. Outside any campaign:
nothing is journaled; the reply is the relay's answer."""

from __future__ import annotations

import secrets
import time
from email.utils import parseaddr
from typing import Callable

import aiosmtplib

from mailerd.schema.config import Config, ServerConfig
from mailerd.control.bounded import TEMPLATE_TIME_LIMIT, TemplateTimeout, run_bounded
from mailerd.message.addresses import check_address
from mailerd.message.check import SpecError, check_message_parts
from mailerd.message.render import Attachment, Renderer, RenderError, TemplateError, format_date, needs_smtputf8
from mailerd.message.signing import DkimKeyError, campaign_signer
from mailerd.schema.control import CampaignSpec, DkimKey, Error, Reply, TestSend, TestSent
from mailerd.supervisor.identity import Identity
from mailerd.worker.connect import greet, smtp_client
from mailerd.worker.smtp import describe, relay_text, smtputf8_refusal


async def test_send(request: TestSend, config: Config, identity: Identity,
                    password_of: Callable[[str], str | None]) -> Reply:
    """`config` as the daemon runs now, `identity` its keys, `password_of(server)` the
    relay password of a server (None: no AUTH)."""
    spec = request.spec
    names = spec.servers or list(config.servers)
    if not names or names[0] not in config.servers:
        return Error(message="test-send: no usable server in the daemon's config")
    name = names[0]
    server = config.servers[name]
    to = check_address(request.to)
    if not to.ok:
        return Error(message=f"test-send: --to {request.to!r}: {to.reason}")
    if len(request.attachments) != len(spec.attachments):
        return Error(message="test-send: the attachments' bytes do not match the campaign's list")
    uid = f"test-{secrets.token_hex(6)}"
    fields = dict(request.fields)
    spec.columns = ["email", *[k for k in fields if k.lower() != "email"]]
    attachments = [Attachment(info.name, info.content_type, data)
                   for info, data in zip(spec.attachments, request.attachments)]
    sender = parseaddr(spec.sender)[1]
    utf8 = needs_smtputf8(sender, to.address)
    try:
        message, msgid = await run_bounded(
            _build, spec, uid, attachments, identity.unsubscribe_key,
            lambda: identity.server_dkim(name, server), server.dkim_domains, name,
            to.address, [fields[c] for c in spec.columns[1:]], utf8)
    except (SpecError, DkimKeyError) as exc:
        return Error(message=f"test-send refused: {exc}")
    except (TemplateError, RenderError) as exc:
        return Error(message=f"test-send: cannot render the message: {exc} "
                             "(give merge fields with --fields NAME=VALUE)")
    except TemplateTimeout:
        return Error(message=f"test-send: rendering the message took more than "
                             f"{TEMPLATE_TIME_LIMIT:g} s; it was stopped")
    smtp = smtp_client(server, password_of(name))
    try:
        return await _send(smtp, name, server, sender, to.address, message, msgid, utf8)
    finally:
        if smtp.is_connected:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()


async def _send(smtp: aiosmtplib.SMTP, name: str, server: ServerConfig, sender: str, to: str,
                message: bytes, msgid: str, utf8: bool) -> Reply:
    """TestSent carries the relay's answer to the transaction (250 only after the "."); a
    session that never got that far (connect, STARTTLS, AUTH) is an Error: nothing was sent."""
    where = f"test-send: {server.host}:{server.port}"
    try:
        await smtp.connect()
        await greet(smtp)  # as a worker does: the extensions are known only after EHLO
    except (aiosmtplib.SMTPException, OSError) as exc:
        return Error(message=f"{where}: nothing was sent: {describe(exc)}")
    if utf8 and not smtp.supports_extension("smtputf8"):
        return Error(message=f"test-send: {smtputf8_refusal(sender, to)}")
    try:
        _, reply = await smtp.sendmail(sender, [to], message,
                                       mail_options=["SMTPUTF8"] if utf8 else [])
        code, text = 250, reply
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refusal = exc.recipients[0]
        code, text = refusal.code, refusal.message
    except aiosmtplib.SMTPResponseException as exc:
        code, text = exc.code, exc.message
    except (aiosmtplib.SMTPException, OSError) as exc:
        return Error(message=f"{where}: {describe(exc)}")
    return TestSent(code=code, reply=relay_text(text), message_id=msgid, server=name)


def _build(spec: CampaignSpec, uid: str, attachments: list[Attachment], unsubscribe_key: bytes,
           server_key: Callable[[], DkimKey | None], server_domains: list[str] | None,
           server_name: str, to: str, fields: list[str], utf8: bool) -> tuple[bytes, str]:
    """The test message, signed, and its Message-ID. Runs member-written template
    code, so it runs bounded (bounded.py)."""
    check_message_parts(spec)
    renderer = Renderer.from_spec(spec, uid, attachments, unsubscribe_key)
    message = renderer.render(line=0, email=to, fields=fields, date=format_date(time.time()),
                              smtputf8=utf8)
    signer = campaign_signer(spec, server_key, server_domains, f"servers.{server_name}.dkim_domains")
    if signer is not None:
        message = signer.sign(message)
    return message, renderer.message_id(0)
