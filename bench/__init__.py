"""mailerd benchmarks: `python -m bench [--quick] [--out FILE] [--markdown FILE]`.

Scenarios (one module each):
  throughput    mailerd end to end vs smtp-source, a prebuilt-message aiosmtplib
                loop, the transport ceiling of mailerd's shape (C processes x 1
                session) and the naive personalised loop, side by side, C = 4 and 16
  scale         a 1,000,000-recipient campaign: enqueue, journal size, report,
                memory of daemon + workers, kill -9 recovery
  journal_cost  journal share of CPU, and the latency the data-sent commit adds
  dkim          the same campaign unsigned, RSA-2048 and Ed25519 signed; ms per
                signature, mailerd's (OpenSSL) against dkimpy's

Every figure is a median of several runs made in the same invocation; only the
ratios between contenders measured side by side are meaningful on a noisy machine.
"""
