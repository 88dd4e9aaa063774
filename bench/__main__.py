"""`python -m bench [--quick] [--out FILE] [--markdown FILE] [--only NAMES] [--profile DIR]`."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import cluster, dkim, journal_cost, longlink, report, scale, throughput
from .tools import BenchUnavailable, ensure_smtp_tools, machine_info

SCENARIOS = ("throughput", "scale", "journal_cost", "dkim", "longlink", "cluster")

FULL = {
    "throughput": {"count": 50_000, "sessions": [4, 16], "repeats": 3, "naive_count": 10_000},
    "scale": {"count": 1_000_000, "sample": 100_000, "repeats": 3, "restarts": 3},
    "journal_cost": {"count": 3_000, "repeats": 5},
    "dkim": {"count": 20_000, "sessions": 4, "repeats": 3, "micro_count": 200},
    "longlink": {"per_session": 300, "sessions": [1, 2, 4], "repeats": 3, "loop_per_session": 40},
    "cluster": {"count": 10_000, "hosts": [1, 2, 3], "sessions": 8, "repeats": 3, "lease": 5.0},
}
QUICK = {
    "throughput": {"count": 2_000, "sessions": [4, 16], "repeats": 1, "naive_count": 400},
    "scale": {"count": 20_000, "sample": 4_000, "repeats": 1, "restarts": 1},
    "journal_cost": {"count": 300, "repeats": 1},
    "dkim": {"count": 500, "sessions": 4, "repeats": 1, "micro_count": 20},
    "longlink": {"per_session": 15, "sessions": [1], "repeats": 1, "loop_per_session": 5},
    "cluster": {"count": 600, "hosts": [1, 2, 3], "sessions": 4, "repeats": 1, "lease": 2.0},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="small N, one run each (CI: checks the harness, not speed)")
    parser.add_argument("--out", default="bench/results.json", help="JSON results file")
    parser.add_argument("--markdown", metavar="FILE",
                        help="also write the tables there (keeping its '## Notes' section)")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--count", type=int, metavar="N",
                        help="messages per run of throughput and dkim (the naive loop: N/5), "
                             "for a full run on a machine too busy for the default")
    parser.add_argument("--profile", metavar="DIR",
                        help="py-spy the daemon and a worker during a C=16 run, then stop")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so daemons get stopped
    try:
        ensure_smtp_tools()
    except BenchUnavailable as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if args.profile:
        return _profile(Path(args.profile), args.quick)
    params = QUICK if args.quick else FULL
    if args.count:
        params = {**params,
                  "throughput": {**params["throughput"], "count": args.count,
                                 "naive_count": max(args.count // 5, 200)},
                  "dkim": {**params["dkim"], "count": args.count}}
    chosen = [name for name in args.only.split(",") if name]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        print(f"bench: unknown scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    results = {"mode": "quick" if args.quick else "full", "machine": machine_info()}
    workdir = Path(tempfile.mkdtemp(prefix="mailerd-bench-"))
    out = Path(args.out)
    try:
        _run(chosen, params, workdir, results, out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _write(results, out, args.markdown)
    return 0


def _run(chosen: list[str], params: dict, workdir: Path, results: dict, out: Path) -> None:
    """Each scenario in turn; the JSON so far is saved after each one."""
    for name in chosen:
        started = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        p = params[name]
        (workdir / name).mkdir(parents=True, exist_ok=True)
        if name == "throughput":
            results[name] = throughput.run(p["count"], p["sessions"], p["repeats"],
                                           workdir / name, p["naive_count"])
        elif name == "scale":
            results[name] = scale.run(p["count"], p["sample"], workdir / name, p["repeats"],
                                      p["restarts"])
        elif name == "dkim":
            results[name] = dkim.run(p["count"], p["sessions"], p["repeats"], workdir / name,
                                     p["micro_count"])
        elif name == "longlink":
            results[name] = longlink.run(p["per_session"], p["sessions"], p["repeats"],
                                         workdir / name, p["loop_per_session"])
        elif name == "cluster":
            results[name] = cluster.run(p["count"], p["hosts"], p["sessions"], p["repeats"],
                                        p["lease"], workdir / name)
        else:
            results[name] = journal_cost.run(results.get("throughput"), p["count"],
                                             p["repeats"], workdir / name)
        results[name]["seconds"] = round(time.monotonic() - started, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str) + "\n")


def _write(results: dict, out: Path, markdown_path: str | None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(report.markdown(results))
    print(f"bench: results in {out}", file=sys.stderr)
    if markdown_path:
        report.write_results_md(Path(markdown_path), results)
        print(f"bench: tables in {markdown_path}", file=sys.stderr)


def _profile(out_dir: Path, quick: bool) -> int:
    from . import profile
    from .tools import Sink

    with Sink() as sink:
        result = profile.record(sink, 16, 4_000 if quick else 40_000, out_dir,
                                duration=2 if quick else 8)
    (out_dir / "profile.json").write_text(json.dumps(result, indent=1))
    profile.print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
