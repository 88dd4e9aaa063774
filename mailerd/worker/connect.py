"""Opening a session with a relay: TCP or implicit TLS, greeting, EHLO, STARTTLS, AUTH.

`smtp_client(server, password).connect()` does all of it, in that order, and
holds the security rules (issue 12, review M7/I2):
- the certificate is checked against `tls_server_name` (default `host`) with the
  system's CAs, or only those of `tls_ca_file` when it is set;
- `security = "starttls"` never goes on in plaintext when STARTTLS is missing or fails;
- AUTH never goes over an unencrypted link unless `allow_plaintext_auth = true`.
A failed step raises SetupFailed (or the relay's own SMTPResponseException, with
the step added to its text), so the session is reported at stage "connect".
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from typing import Any

import aiosmtplib

from mailerd.schema.config import ServerConfig


class SetupFailed(aiosmtplib.SMTPException):
    """A session could not be set up; the text names the relay and the step."""


def tls_context(server: ServerConfig) -> ssl.SSLContext:
    """The client TLS context for a relay: its own CA bundle, or the system's."""
    cafile = os.path.expandvars(server.tls_ca_file) if server.tls_ca_file else None
    context = ssl.create_default_context(cafile=cafile)
    if not server.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def tls_name(server: ServerConfig) -> str:
    return server.tls_server_name or server.host


class RelaySMTP(aiosmtplib.SMTP):
    """An aiosmtplib client whose connect() sets the whole session up, step by step."""

    def __init__(self, server: ServerConfig, password: str | None) -> None:
        super().__init__(
            hostname=server.host,
            port=server.port,
            timeout=server.timeout,
            use_tls=server.security == "tls",
            start_tls=False,  # done here, so that it can never be skipped or fall back
            validate_certs=server.tls_verify,
            tls_context=tls_context(server) if server.security != "none" else None,
            local_hostname=server.helo_name or socket.gethostname(),
        )
        self.relay = server
        self._secret = password

    def where(self) -> str:
        return f"{self.relay.host}:{self.relay.port}"

    async def connect(self, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        step = "connect"
        try:
            if self.relay.security == "tls" and self.relay.tls_server_name:
                kwargs.update(await self._socket_for_named_tls())
            response = await super().connect(**kwargs)
            step = "EHLO"
            await greet(self)
            if self.relay.security == "starttls":
                step = "STARTTLS"
                await self._start_tls()
            if self.relay.username:
                step = "AUTH"
                await self._authenticate()
        except aiosmtplib.SMTPResponseException as exc:
            self.close()
            suffix = "" if step == "connect" else f" (at {step})"
            raise aiosmtplib.SMTPResponseException(exc.code, f"{exc.message}{suffix}") from None
        except SetupFailed:
            self.close()
            raise
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.close()
            raise SetupFailed(f"{step} with {self.where()} failed: {exc}") from None
        return response

    async def _socket_for_named_tls(self) -> dict[str, Any]:
        """Implicit TLS checked against tls_server_name: aiosmtplib passes the name only with a socket."""
        sock = await asyncio.wait_for(asyncio.to_thread(
            socket.create_connection, (self.relay.host, self.relay.port), self.relay.timeout),
            self.relay.timeout)
        sock.setblocking(False)
        return {"sock": sock, "hostname": self.relay.tls_server_name, "port": None}

    async def _start_tls(self) -> None:
        if not self.supports_extension("starttls"):
            raise SetupFailed(f'{self.where()} does not offer STARTTLS; security = "starttls" '
                              "never continues without it")
        await self.starttls(server_hostname=tls_name(self.relay))
        await greet(self)  # the extensions offered over TLS (AUTH often appears only now)

    async def _authenticate(self) -> None:
        encrypted = self.get_transport_info("sslcontext") is not None
        if not encrypted and not self.relay.allow_plaintext_auth:
            raise SetupFailed(f"refusing AUTH over an unencrypted connection to {self.where()}: "
                              'use security = "starttls" or "tls" (or allow_plaintext_auth = true)')
        await self.login(self.relay.username or "", self._secret or "")


def smtp_client(server: ServerConfig, password: str | None) -> RelaySMTP:
    """An unconnected SMTP client for a configured server (the workers' and test-send's)."""
    return RelaySMTP(server, password)


async def greet(smtp: aiosmtplib.SMTP) -> None:
    """EHLO (HELO for old relays) unless it was already done on this connection."""
    if smtp.last_ehlo_response is not None or smtp.last_helo_response is not None:
        return
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError as exc:
        if exc.code == 421:
            raise
        await smtp.helo()
