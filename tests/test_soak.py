"""load_tests/soak.py, briefly, against the session server: the report's figures, the memory verdict, two legs."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def soak(server, out, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(REPO / "load_tests" / "soak.py"),
        "--url",
        server.http_url,
        "--grpc-url",
        server.grpc_url,
        "--metrics-url",
        server.metrics_url,
        "--users",
        "5",
        "--sample-every",
        "2",
        "--warmup",
        "0",
        "--steps",
        "8,12",
        "--cancel-fraction",  # 0.4, not 0.2: a 15 s run on a loaded machine sends about 20 streams, and
        "0.4",  # each kind of outcome must occur (at 0.2, none cancelled in about 1 run in 100)
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def test_short_soak_reports_errors_memory_streams_and_an_unjudged_slope(server, tmp_path):
    result = soak(server, tmp_path, "--duration", "0m15s", "--server-log", str(server.log_file))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["unexpected_errors"] == 0 and report["errors"] == [] and report["failures"] == []
    kinds = report["by_kind"]
    assert all(kinds[kind]["count"] > 0 for kind in ("good", "cancelled", "stream good", "stream cancelled")), kinds
    assert all(count > 0 for count in report["invalid_by_type"].values()), report["invalid_by_type"]
    cancellations = report["cancellations"]  # the server's counts, within the share of late cancels (failures)
    assert cancellations["txt2img_stream"]["client"] == kinds["stream cancelled"]["count"]
    assert cancellations["txt2img"]["client"] == kinds["cancelled"]["count"]
    assert all(counts["server"] > 0 for counts in cancellations.values()), cancellations
    for counts in cancellations.values():  # the server's log names each one by the client's request id
        assert counts["server_logged"] == counts["server"] and counts["server_not_client"] == [], counts
        assert len(counts["client_not_server"]) == counts["client"] - counts["server"], counts
    assert report["active_sequences_end"] == 0
    assert report["requests_per_s"] > 0 and report["triton_restarts_seen"] == 0
    assert report["duration_s"] >= 15 and len(report["legs"]) == 1
    memory = report["memory"]
    assert set(memory["by_process_end_mib"]) == {
        "tritonserver",
        "denoise_step_0_0",
        "text_encoder_0_0",
        "txt2img_stream_0_0",
        "vae_decode_0_0",
        *(f"txt2img_0_{index}" for index in range(4)),  # txt2img runs four instances
    }
    assert 0 < memory["start_mib"] <= memory["max_mib"] and memory["end_mib"] <= memory["max_mib"]
    assert report["gpu_memory"] is None  # CPU: no GPU, which is no failure
    growth = report["growth"]
    assert not growth["judged"] and growth["verdict"].startswith("too short to judge") and not growth["too_fast"]
    assert set(growth["mib_per_min"]) == {"RSS, all processes", "RSS, tritonserver"}
    assert set(growth["by_process_mib_per_min"]) == set(memory["by_process_end_mib"])
    kept = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert kept == report["samples"]  # written as they were taken
    summary = (tmp_path / "soak.md").read_text()
    assert "| **all** |" in summary and "Unexpected errors: none." in summary and "**PASS**" in summary
    assert "GPU memory: no GPU" in summary and "too short to judge" in summary

    # A second leg continuing the first (--previous), whose samples are moved 10 minutes back: the run
    # then spans over 10 minutes and its growth is judged, here against a limit that any slope exceeds.
    previous = tmp_path / "earlier"
    previous.mkdir()
    for entry in report["samples"]:
        entry["time"] -= 600
    (previous / "soak.json").write_text(json.dumps(report))
    second = tmp_path / "second"
    result = soak(server, second, "--duration", "6s", "--previous", str(previous), "--max-growth-mib-per-min=-1e9")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((second / "soak.json").read_text())
    assert len(report["legs"]) == 2 and report["triton_restarts_seen"] == 0 and report["unexpected_errors"] == 0
    growth = report["growth"]
    assert growth["judged"] and growth["window_s"][0] > 300 and growth["verdict"].startswith("growing")
    assert len(report["failures"]) == 1 and report["failures"][0].startswith("memory growing")
    assert growth["denoiser_graphs_window"] == [0, 0]  # the runner's graphs in the judged half (none on CPU)
    assert growth["gpu_by_process_mib_per_min"] == {}  # no nvidia-smi here
    summary = (second / "soak.md").read_text()
    assert "**FAIL**: memory growing" in summary
    assert "CUDA graphs the denoiser had captured: 0 when the last half began, 0 at its end." in summary


def test_gpu_memory_per_process_from_nvidia_smi():
    """The per-process GPU memory the soak samples: summed over a process's GPUs, unreadable lines left out."""
    from stepdiff.server import gpu_mib_by_pid

    output = "1234, 4486\n1234, 518\n77, [N/A]\n\n99, 910\n"
    assert gpu_mib_by_pid(output) == {1234: 5004.0, 99: 910.0}
