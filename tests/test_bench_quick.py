"""`python -m bench --quick` runs end to end, so the benchmark code never rots.

Nothing is asserted about speed: CI machines are shared and noisy. Needs Postfix's
smtp-sink/smtp-source (the bench installs Debian's postfix itself when it can).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tools import BenchUnavailable, ensure_smtp_tools  # noqa: E402

EXPECTED = {
    "throughput": {"count", "by_sessions", "targets"},
    "scale": {"count", "sample", "summary", "targets", "small", "big"},
    "journal_cost": {"cpu", "window", "targets"},
    "dkim": {"end_to_end", "ratios", "targets", "micro"},
}
CLUSTER_SETUPS = {"sqlite", "pg_1", "pg_2", "pg_3"}
CONTENDERS = {"mailerd", "smtp_source", "prebuilt", "prebuilt_uvloop", "ceiling", "naive", "ratios"}


@pytest.fixture(scope="module")
def smtp_tools() -> None:
    try:
        ensure_smtp_tools()
    except BenchUnavailable as exc:
        pytest.skip(f"benchmarks need Postfix's smtp-sink/smtp-source: {exc}")


@pytest.mark.timeout(600)
def test_quick_bench_writes_every_scenario(smtp_tools: None, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    markdown = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--markdown", str(markdown)],
        cwd=ROOT, capture_output=True, text=True, timeout=580,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    for scenario, keys in EXPECTED.items():
        assert keys <= set(results[scenario]), (scenario, sorted(results[scenario]))
    for sessions in ("4", "16"):
        at = results["throughput"]["by_sessions"][sessions]
        assert CONTENDERS <= set(at)
        assert at["mailerd"]["median"]["rate"] > 0
        assert at["ceiling"]["median"]["rate"] > 0 and at["ceiling"]["median"]["cpu_ms_per_msg"] > 0
        assert 0 < at["mailerd"]["median"]["journal_cpu_share"] < 1
    assert set(results["throughput"]["targets"]) == {"vs_prebuilt", "vs_naive", "vs_smtp_source",
                                                     "cpu_ms_per_msg"}
    assert set(results["journal_cost"]["targets"]) == {"journal_cpu_share"}
    assert set(results["scale"]["targets"]) == {"enqueue_s", "report_s", "pss_mb", "restart_s"}
    assert "journal/full" in results["journal_cost"]["window"]["ms_per_msg"]
    assert set(results["dkim"]["end_to_end"]) == {"unsigned", "rsa", "ed25519"}
    assert results["dkim"]["micro"]["rsa"]["ours_ms"] > 0
    cluster = results["cluster"]
    if "skipped" not in cluster:  # no PostgreSQL server binaries here: said in the table
        assert set(cluster["by_setup"]) == CLUSTER_SETUPS
        assert all(m["rate"] > 0 and m["commit_ms_per_msg"] > 0 for m in cluster["by_setup"].values())
        assert cluster["by_setup"]["pg_1"]["postgresql_ms_per_msg"] > 0
        assert set(cluster["targets"]) == {"pg_vs_sqlite", "takeover_s"}
        assert 0 < cluster["takeover_s"] < 60
    text = markdown.read_text()
    assert "### 1. Throughput" in text and "### DKIM" in text
    assert "transport ceiling" in text and "cpu_ms_per_msg ≤ 0.3 ms" in text
    assert "### Several hosts on PostgreSQL" in text
