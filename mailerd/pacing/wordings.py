"""The default wordings of relay limits: one regular expression per entry, its source beside it.

Pure data (no imports from mailerd), read by classify.py. `cause` names the
`[patterns]` key the entry belongs to (too_many_sessions, rate, quota,
session_length). Entries are tried in this order and the first match wins, so the
specific wordings (session length, quota) come before the general ones (rate).
Patterns are case-insensitive and searched anywhere in the reply text.

Sources: "relay-replies.md" is the project's collection of replies reported in public
issue trackers (repository#number given); "postfix 3.7 smtpd"/"postscreen" are the
reply strings in Debian's postfix 3.7.11 binaries (`strings /usr/lib/postfix/sbin/smtpd`);
other entries cite the vendor's documentation of its SMTP replies.
"""

from __future__ import annotations

from typing import NamedTuple


class Wording(NamedTuple):
    cause: str  # a [patterns] key
    pattern: str
    source: str
    closing_only: bool = False  # a limit only when the relay also closes the session (421)


DEFAULT_WORDINGS: tuple[Wording, ...] = (
    # ---------------------------------------------------------------- session length
    Wording("session_length",
            r"too many (messages|mails|e-?mails) (in|per|for) (this |one |a |the )?(smtp )?(connection|session)",
            "relay-replies.md: knadh/listmonk#1181, postalserver/postal#1200"),
    Wording("session_length", r"(messages|mails|e-?mails) per (smtp )?(connection|connect|session)",
            "relay-replies.md: tine20/tine20#4142 (HostEurope 10 mails per smtp connect)"),
    Wording("session_length", r"in one session",
            "relay-replies.md: postalserver/postal#495 (Barracuda)"),
    Wording("session_length", r"error: too many errors",
            "postfix 3.7 smtpd: '421 4.7.0 %s Error: too many errors' (smtpd_hard_error_limit per session)"),
    # ---------------------------------------------------------------- quota
    Wording("quota", r"quota",
            "relay-replies.md: gen-smtp/gen_smtp#140 (Gmail 5.4.5), WWBN/AVideo#7527 (relay quota of 500); "
            "MicrosoftDocs/OfficeDocs-Support#1150 (SubmissionQuotaExceededException); "
            "Amazon SES 'Daily message quota exceeded' (docs.aws.amazon.com/ses, SMTP response codes)"),
    Wording("quota", r"daily (user )?sending limit",
            "relay-replies.md: PHPMailer/PHPMailer#2113 (Gmail 550-5.4.5 Daily user sending limit exceeded)"),
    Wording("quota", r"sending limit (exceeded|reached)",
            "Google Workspace admin help 'Gmail sending limits' (550 5.4.5); Mailgun 'sending limit reached'"),
    Wording("quota", r"(daily|hourly|per day|per hour|24 hour)\b.*\blimit",
            "relay-replies.md: tine20/tine20#4142 (t-online 100 mails per day)"),
    Wording("quota", r"maximum credits exceeded",
            "SendGrid docs 'SMTP errors and troubleshooting': '451 Authentication failed: Maximum credits exceeded'"),
    # ---------------------------------------------------------------- too many sessions
    Wording("too_many_sessions", r"too many (concurrent |simultaneous |parallel |open )?(smtp )?connections",
            "postfix 3.7 smtpd '421 4.7.0 %s Error: too many connections from %s' (anvil count/rate); "
            "postscreen '421 4.7.0 Error: too many connections'; Exim smtp_accept_max_per_host "
            "'421 Too many concurrent SMTP connections from this IP address; please try again later' "
            "(Exim spec ch. 14); relay-replies.md PHPMailer/PHPMailer#2070, kootenpv/yagmail#117; "
            "Sendmail conncontrol '421 4.3.2 Too many open connections' (cf/README FEATURE(conncontrol))"),
    Wording("too_many_sessions", r"concurrent connections? limit",
            "relay-replies.md: sabuhish/fastapi-mail#75 (Microsoft 365 432 4.3.2)"),
    Wording("too_many_sessions", r"maximum number of concurrent (server )?connections",
            "Exchange Server 'Message size and recipient limits'/receive connector MaxInboundConnectionPerSource: "
            "'421 4.3.2 The maximum number of concurrent server connections has exceeded a limit'"),
    Wording("too_many_sessions", r"connection (rate )?limit",
            "Sendmail ratecontrol '421 4.3.2 Connection rate limit exceeded.' (cf/README FEATURE(ratecontrol))"),
    Wording("too_many_sessions", r"thread limit",
            "relay-replies.md: timeoff-management/timeoff-management-application#308 (M365 sender thread limit)"),
    Wording("too_many_sessions", r"too many (login|auth\w*) (attempts|commands)",
            "relay-replies.md: nodemailer/nodemailer#1388 (Gmail 454 4.7.0 Too many login attempts); "
            "postfix 3.7 smtpd '450 4.7.1 Error: too many AUTH commands from %s'"),
    Wording("too_many_sessions", r"too many sessions", "generic wording"),
    Wording("too_many_sessions", r"too many new tls sessions",
            "postfix 3.7 smtpd '421 4.7.0 %s Error: too many new TLS sessions from %s'"),
    Wording("too_many_sessions", r"all server ports are busy",
            "postfix 3.7 postscreen '421 4.3.2 All server ports are busy'"),
    # ---------------------------------------------------------------- rate
    Wording("rate", r"too much mail from",
            "postfix 3.7 smtpd '450 4.7.1 Error: too much mail from %s' (smtpd_client_message_rate_limit)"),
    Wording("rate", r"too many recipients from",
            "postfix 3.7 smtpd '450 4.7.1 Error: too many recipients from %s' (smtpd_client_recipient_rate_limit)"),
    Wording("rate", r"rate[ -]?limit",
            "relay-replies.md: mailcow/mailcow-dockerized#1497, Mailu/Mailu#3013 (Outlook 4.7.651), "
            "knadh/listmonk#1073 (Strato); Exim ACL ratelimit 'rate limited' (Exim spec ch. 42.38)"),
    Wording("rate", r"sender rate|sending rate|submission rate|transmit rate|message rate|rate of",
            "Exim ratelimit example ACL 'Sender rate $sender_rate / $sender_rate_period'; relay-replies.md "
            "knadh/listmonk#2273 (SES Maximum sending rate), #164 (4.4.2 submission rate); "
            "M365 '4.5.127 Excessive message rate from sender'; Gmail 421-4.7.28 'unusual rate of unsolicited mail'"),
    Wording("rate", r"throttl", "relay-replies.md: knadh/listmonk#2273 (Amazon SES 454 Throttling failure)"),
    Wording("rate", r"too many requests",
            "relay-replies.md: knadh/listmonk#2509 (MailerSend); Mailgun '421 Too many requests'"),
    Wording("rate", r"too many recipient", "relay-replies.md: knadh/listmonk#1300"),
    Wording("rate", r"slow down", "relay-replies.md: E-F-A/v4#191"),
    Wording("rate", r"excessive (message|mail)", "M365 '450 4.5.127 Excessive message rate from sender'"),
    Wording("rate", r"\[TSS?0\d\]",
            "relay-replies.md: KumoCorp/kumomta#51 (Yahoo 421 4.7.0 [TSS04]); Yahoo sender hub SMTP error codes"),
    Wording("rate", r"unusual rate",
            "Google Workspace 'SMTP error reference': 421-4.7.28 / 4.7.0 unusual rate of unsolicited mail"),
    Wording("rate", r"server busy",
            "Microsoft 365 '451 4.7.500 Server busy. Please try again later' (Exchange Online NDR docs)"),
    Wording("rate", r"try again in (\d+) ?(s|sec|seconds?|m|min|minutes?)\b",
            "relay-replies.md: gophish/gophish#521 ('422 try again in 15 seconds')"),
    # closing only: a 450/451 with these words is ordinary greylisting or a per-recipient deferral
    Wording("rate", r"temporarily deferred", "relay-replies.md: KumoCorp/kumomta#51 (Yahoo)", True),
    Wording("rate", r"try again later",
            "relay-replies.md: datawookie/emayili#71 (Gmail 421 4.7.0 Try again later, closing connection)",
            True),
)
