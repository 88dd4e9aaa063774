"""Scenario "DKIM": what signing costs a campaign (issue 13).

End to end, interleaved and repeated against one smtp-sink, C sessions:
  unsigned  the benchmark campaign (throughput.py's, personalised text + html)
  rsa       the same campaign with its own RSA-2048 DKIM key
  ed25519   the same campaign with its own Ed25519 key
Target: each signed rate >= 0.8x the unsigned one.

And a micro figure, in this process: CPU milliseconds per signature of a rendered
benchmark message (a different recipient each time, so no body hash is reused),
mailerd's signer (canonicalisation in Python, the key operation in OpenSSL)
against dkimpy's `dkim.sign` (all in Python) with the same key and header list.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailerd.message.render import Renderer, format_date
from mailerd.message.signing import Signer

from . import data
from .throughput import run_mailerd
from .tools import Sink, interleaved, median, median_of

KINDS = ("rsa", "ed25519")
TARGET = 0.8  # signed rate / unsigned rate
DOMAIN, SELECTOR = "example.org", "bench"


def run(count: int, sessions: int, repeats: int, workdir: Path, micro_count: int) -> dict:
    keys = _write_keys(workdir)
    recipients = data.write_list(workdir / "list.csv", count)
    campaigns = {"unsigned": data.write_campaign(workdir / "unsigned")}
    for kind in KINDS:
        campaigns[kind] = _signed_campaign(workdir / kind, keys[kind])
    with Sink() as sink:
        contenders: dict[str, Callable[[], dict]] = {
            name: (lambda campaign=campaign: run_mailerd(sink, sessions, count, campaign,
                                                         recipients, workdir))
            for name, campaign in campaigns.items()
        }
        runs = interleaved(repeats, contenders)
    end_to_end = {name: {"median": {key: median_of(results, key) for key in
                                    ("rate", "cpu_ms_per_msg", "workers_cpu_ms_per_msg")},
                         "runs": results}
                  for name, results in runs.items()}
    unsigned = end_to_end["unsigned"]["median"]["rate"]
    ratios = {kind: end_to_end[kind]["median"]["rate"] / unsigned for kind in KINDS}
    return {
        "count": count, "sessions": sessions, "repeats": repeats,
        "end_to_end": end_to_end, "ratios": ratios,
        "targets": {f"{kind}_vs_unsigned": {"target": TARGET, "measured": ratios[kind],
                                            "met": ratios[kind] >= TARGET} for kind in KINDS},
        "micro": micro(keys, micro_count),
    }


def _write_keys(workdir: Path) -> dict[str, Path]:
    none = serialization.NoEncryption()
    pem = serialization.Encoding.PEM
    texts = {
        "rsa": rsa.generate_private_key(65537, 2048).private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, none),
        "ed25519": ed25519.Ed25519PrivateKey.generate().private_bytes(
            pem, serialization.PrivateFormat.PKCS8, none),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, text in texts.items():
        paths[kind] = workdir / f"{kind}.pem"
        paths[kind].write_bytes(text)
    return paths


def _signed_campaign(directory: Path, key: Path) -> Path:
    campaign = data.write_campaign(directory)
    with campaign.open("a") as out:
        out.write(f'dkim = {{ domain = "{DOMAIN}", selector = "{SELECTOR}", key_file = "{key}" }}\n')
    return campaign


# ---------------------------------------------------------------- micro


def micro(keys: dict[str, Path], count: int) -> dict:
    """ms per signature: ours and dkimpy's (None when dkimpy is not installed)."""
    messages = _rendered(count)
    result = {}
    for kind in KINDS:
        signer = Signer(DOMAIN, SELECTOR, keys[kind].read_text())
        ours = _ms_per_call(lambda m: signer.sign(m), messages)
        theirs = _dkimpy_ms(signer, keys[kind], messages)
        result[kind] = {"ours_ms": ours, "dkimpy_ms": theirs,
                        "speedup": None if theirs is None else theirs / ours}
    return result


def _rendered(count: int) -> list[bytes]:
    renderer = Renderer(sender=data.SENDER, subject=data.SUBJECT, text=data.TEXT, html=data.HTML,
                        columns=list(data.FIELDS), campaign_uid="bench-dkim")
    date = format_date(time.time())
    return [renderer.render(line=i + 2, email=data.recipient(i)[0],
                            fields=list(data.recipient(i)[1:]), date=date)
            for i in range(count)]


def _ms_per_call(sign: Callable[[bytes], bytes], messages: list[bytes]) -> float:
    """Median over three passes of the mean CPU time per message (CPU, not wall: one
    thread, and a shared machine stretches wall time alone)."""
    passes = []
    for _ in range(3):
        started = time.process_time()
        for message in messages:
            sign(message)
        passes.append(1000 * (time.process_time() - started) / len(messages))
    return median(passes)


def _dkimpy_ms(signer: Signer, key: Path, messages: list[bytes]) -> float | None:
    try:
        import dkim
    except ImportError:
        return None
    include = _signed_names(signer.sign(messages[0]))
    if signer.algorithm == b"ed25519-sha256":
        loaded = serialization.load_pem_private_key(key.read_bytes(), None)
        private = base64.b64encode(loaded.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption()))
    else:
        private = key.read_bytes()
    return _ms_per_call(lambda m: dkim.sign(
        m, signer.selector, signer.domain, private, canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=signer.algorithm, include_headers=include), messages)


def _signed_names(signed: bytes) -> list[bytes]:
    field = signed.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ")
    h = field.split(b" h=", 1)[1].split(b";", 1)[0]
    return [name.strip() for name in h.split(b":")]


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    out = [f"### DKIM: N = {result['count']:,}, C = {result['sessions']} sessions, the throughput "
           f"campaign unsigned and signed with its own key; median of {result['repeats']}", "",
           "| campaign | msg/s | CPU ms/msg | workers CPU ms/msg | ÷ unsigned |",
           "|---|---:|---:|---:|---:|"]
    for name in ("unsigned", *KINDS):
        median_ = result["end_to_end"][name]["median"]
        ratio = 1.0 if name == "unsigned" else result["ratios"][name]
        out.append(f"| {name} | {median_['rate']:,.0f} | {median_['cpu_ms_per_msg']:.3f} | "
                   f"{median_['workers_cpu_ms_per_msg']:.3f} | {ratio:.2f} |")
    out += ["", "| signature, CPU ms per message | mailerd (OpenSSL) | dkimpy | speed-up |",
            "|---|---:|---:|---:|"]
    for kind in KINDS:
        row = result["micro"][kind]
        theirs = "-" if row["dkimpy_ms"] is None else f"{row['dkimpy_ms']:.3f}"
        speedup = "-" if row["speedup"] is None else f"{row['speedup']:.1f}x"
        out.append(f"| {kind} | {row['ours_ms']:.3f} | {theirs} | {speedup} |")
    out += ["", "| target | wanted | measured | met |", "|---|---:|---:|---|"]
    for name, target in result["targets"].items():
        out.append(f"| {name} | >= {target['target']} | {target['measured']:.2f} | "
                   f"{'yes' if target['met'] else 'no'} |")
    return "\n".join(out)
