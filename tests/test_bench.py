"""The benchmark's --quick mode as a smoke test: it completes and reports
every figure.  No timing is asserted here; the figures and their targets
live in the benchmark (see BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
FIGURES = {
    "cores", "python",
    "lease_release_median_ms", "lease_release_p99_ms",
    "lease_release_new_connection_median_ms",
    "portserver_request_median_ms", "ratio_to_portserver",
    "throughput_leases_per_s", "throughput_conflicts",
    "cli_command", "cli_lease_true_median_ms", "python_pass_median_ms", "cli_overhead_ms",
    "cold_start_median_ms",
    "reclaim_median_ms", "reclaim_p99_ms",
    "readoption_s",
    "leftover_release_s",
    "gc_s",
    "rss_per_lease_kib", "fds_per_lease",
    "ttl_lease_rss_kib_per_1000", "ttl_renewal_rss_kib_per_1000",
    "plugin_inert_cost_ms", "plugin_import_ms",
    "net_private_extra_ms", "plugin_per_test_ms",
    "squat_failed_grant_ms", "squat_uds_lease_alone_p99_ms", "squat_uds_lease_p99_ms",
}


def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert FIGURES <= set(figures), f"missing: {sorted(FIGURES - set(figures))}"
    assert figures["throughput_conflicts"] == 0, "two live leases shared a port or a directory"
    for name in FIGURES - {"python", "cli_command"}:
        assert isinstance(figures[name], (int, float)), name
    # The table on stdout lists the same figures.
    for name in FIGURES:
        assert name in done.stdout
