"""`mailerctl test-send`: one message, rendered as a campaign's would be, sent
through the first server the campaign may use (its `servers`, else the config's
first) over a short-lived SMTP session of the daemon's own. Outside any campaign:
nothing is journaled; the reply is the relay's answer."""

from __future__ import annotations

import secrets
import time
from email.utils import parseaddr
from typing import TYPE_CHECKING

import aiosmtplib

from mailerd.message.addresses import check_address
from mailerd.control.enqueue import SpecError, check_message_parts
from mailerd.schema.control import Error, Reply, TestSend, TestSent
from mailerd.message.render import Attachment, Renderer, RenderError, TemplateError, format_date, needs_smtputf8
from mailerd.message.signing import campaign_signer
from mailerd.worker.smtp import describe, greet, smtp_client, smtputf8_refusal

if TYPE_CHECKING:
    from mailerd.control.commands import Commands


async def test_send(commands: "Commands", request: TestSend) -> Reply:
    config = commands.config
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
    try:
        check_message_parts(spec)
    except SpecError as exc:
        return Error(message=f"test-send refused: {exc}")
    uid = f"test-{secrets.token_hex(6)}"
    fields = dict(request.fields)
    spec.columns = ["email", *[k for k in fields if k.lower() != "email"]]
    attachments = [Attachment(info.name, info.content_type, data)
                   for info, data in zip(spec.attachments, request.attachments)]
    sender = parseaddr(spec.sender)[1]
    utf8 = needs_smtputf8(sender, to.address)
    try:
        renderer = Renderer.from_spec(spec, uid, attachments, commands.supervisor.identity.unsubscribe_key)
        message = renderer.render(line=0, email=to.address,
                                  fields=[fields[c] for c in spec.columns[1:]],
                                  date=format_date(time.time()), smtputf8=utf8)
    except (TemplateError, RenderError) as exc:
        return Error(message=f"test-send: cannot render the message: {exc} "
                             "(give merge fields with --fields NAME=VALUE)")
    signer = campaign_signer(spec, lambda: commands.supervisor.identity.server_dkim(name, server))
    if signer is not None:
        message = signer.sign(message)
    smtp = smtp_client(server, commands.supervisor.passwords.get(name))
    msgid = renderer.message_id(0)
    try:
        await smtp.connect()
        await greet(smtp)  # as a worker does: the extensions are known only after EHLO
        if utf8 and not smtp.supports_extension("smtputf8"):
            return Error(message=f"test-send: {smtputf8_refusal(sender, to.address)}")
        _, reply = await smtp.sendmail(sender, [to.address], message,
                                       mail_options=["SMTPUTF8"] if utf8 else [])
        code, text = 250, reply
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refusal = exc.recipients[0]
        code, text = refusal.code, refusal.message
    except aiosmtplib.SMTPResponseException as exc:
        code, text = exc.code, exc.message
    except (aiosmtplib.SMTPException, OSError) as exc:
        return Error(message=f"test-send: {server.host}:{server.port}: {describe(exc)}")
    finally:
        if smtp.is_connected:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()
    return TestSent(code=code, reply=text, message_id=msgid, server=name)
