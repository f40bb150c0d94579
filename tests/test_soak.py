"""load_tests/soak.py, briefly, against the session server: the report's figures and no unexpected errors."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_short_soak_reports_errors_memory_and_active_sequences(server, tmp_path):
    command = [
        sys.executable,
        str(REPO / "load_tests" / "soak.py"),
        "--url",
        server.http_url,
        "--grpc-url",
        server.grpc_url,
        "--metrics-url",
        server.metrics_url,
        "--duration",
        "10s",
        "--users",
        "4",
        "--sample-every",
        "2",
        "--warmup",
        "0",
        "--steps",
        "8,12",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["unexpected_errors"] == 0 and report["errors"] == []
    assert report["by_kind"]["good"]["count"] > 0 and report["by_kind"]["cancelled"]["count"] > 0
    assert all(count > 0 for count in report["invalid_by_type"].values()), report["invalid_by_type"]
    assert report["cancelled_by_server"] > 0
    assert report["active_sequences_end"] == 0
    assert report["requests_per_s"] > 0 and report["triton_restarts_seen"] == 0
    memory = report["memory"]
    assert set(memory["by_process_end_mib"]) == {
        "tritonserver",
        "denoise_step_0_0",
        "text_encoder_0_0",
        "txt2img_stream_0_0",
        "vae_decode_0_0",
        *(f"txt2img_0_{index}" for index in range(4)),  # txt2img runs four instances
    }
    assert 0 < memory["rss_start_mib"] <= memory["rss_max_mib"] and memory["rss_end_mib"] <= memory["rss_max_mib"]
    summary = (tmp_path / "soak.md").read_text()
    assert "| **all** |" in summary and "Unexpected errors: none." in summary
