"""locust and perf_analyzer run against the real server and write their reports."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from conftest import REPO, require_system


def test_locust_headless_run_has_requests_and_no_failures(server, tmp_path):
    """15 s, 4 users over HTTP and gRPC, 30% of gRPC requests cut off mid-way by a deadline."""
    cancelled_before = server.metric("stepdiff_cancelled_requests_total")
    command = [
        str(Path(sys.executable).parent / "locust"),
        "-f",
        str(REPO / "load_tests" / "locustfile.py"),
        "--headless",
        "-u",
        "4",
        "-r",
        "4",
        "-t",
        "15s",
        "--host",
        f"http://{server.http_url}",
        "--grpc-url",
        server.grpc_url,
        "--csv",
        str(tmp_path / "locust"),
        "--html",
        str(tmp_path / "report.html"),
        "--only-summary",
        "--cancel-fraction",
        "0.3",
        "--cancel-after",
        "0.03",
        "--steps",
        "8,12",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "locust_stats.csv") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    assert any(name.startswith("txt2img grpc") for name in rows) and any(
        name.startswith("txt2img http") for name in rows
    )
    assert (tmp_path / "report.html").stat().st_size > 1000
    cancelled = [row for name, row in rows.items() if name.endswith("cancelled")]
    assert cancelled and sum(int(row["Request Count"]) for row in cancelled) > 0
    assert server.metric("stepdiff_cancelled_requests_total") > cancelled_before
    summary = report(tmp_path, "--locust", str(tmp_path / "locust"), "--perf", str(tmp_path / "none"))
    assert "## locust" in summary and "| Aggregated |" in summary and "perf_analyzer" not in summary


def test_perf_analyzer_on_txt2img_and_denoise_step_sequences(server, tmp_path):
    sys.path.insert(0, str(REPO / "load_tests"))
    from perf_analyzer import perf_analyzer_command

    try:
        perf_analyzer_command()
    except SystemExit as error:  # e.g. "perf_analyzer cannot start: this machine lacks libb64.so.0d (...)"
        require_system(str(error).split(": ", 1)[-1], "apt-get install libb64-0d")
    command = [
        sys.executable,
        str(REPO / "load_tests" / "perf_analyzer.py"),
        "--url",
        server.grpc_url,
        "--out",
        str(tmp_path),
        "--concurrency",
        "1:2:1",
        "--sequences",
        "1:2:1",
        "--measurement-interval",
        "1500",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for model in ("txt2img", "denoise_step"):
        with open(tmp_path / f"{model}.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert [row["Concurrency"] for row in rows] == ["1", "2"]
        assert all(float(row["Inferences/Second"]) > 0 for row in rows)
    assert "had error" not in (tmp_path / "denoise_step.log").read_text()
    assert server.metric("stepdiff_active_sequences") == 0
    summary = report(tmp_path, "--perf", str(tmp_path), "--locust", str(tmp_path / "none"))
    assert "## perf_analyzer: txt2img" in summary and "## perf_analyzer: denoise_step" in summary
    assert (tmp_path / "report" / "txt2img.png").stat().st_size > 5000


def report(tmp_path: Path, *args: str) -> str:
    """Run load_tests/report.py; return the markdown it wrote."""
    command = [sys.executable, str(REPO / "load_tests" / "report.py"), *args, "--out", str(tmp_path / "report")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return (tmp_path / "report" / "summary.md").read_text()


def test_a_missing_library_is_named():
    """perf_analyzer's check reads ldd: a machine without libb64 gets its name, not a cryptic exit code."""
    sys.path.insert(0, str(REPO / "load_tests"))
    from perf_analyzer import missing_libraries

    ldd = (
        "\tlibb64.so.0d => not found\n"
        "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n"
        "\tlibcudart.so.12 => not found\n"
    )
    assert missing_libraries(ldd) == ["libb64.so.0d", "libcudart.so.12"]


STOPPING_USERS = """
import sys
sys.path.insert(0, sys.argv[1])
import soak  # the soak's users: locustfile's three and the invalid-input user
from locust.argument_parser import parse_options
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import STATE_CLEANUP

options = parse_options(["--headless", "--grpc-url", "127.0.0.1:9"])
env = Environment(user_classes=list(soak.USERS.values()), host="http://127.0.0.1:9", parsed_options=options)
env.create_local_runner().state = STATE_CLEANUP  # what runner.stop() sets before it stops any user
fired = []
env.events.request.add_listener(lambda **event: fired.append(event["name"]))
for user_class in soak.USERS.values():
    user_class.host = env.host  # as locust's runner sets it
    user = user_class(env)
    user.on_start()
    task = user.tasks[0]
    try:
        task(user)
    except StopUser:
        print(user_class.__name__, "stopped")
    user.on_stop()
print("fired", fired, "next id", next(soak.locustfile.REQUEST_IDS).rsplit("-", 1)[1])
"""


def test_a_user_woken_as_the_run_stops_sends_nothing():
    """Locust kills a waiting user at once when the run stops, but a user whose wait ends just then runs
    before the kill lands: it must stop instead of sending a request that the kill would cut off
    unrecorded (the server counted it as cancelled, the soak's client never saw it)."""
    result = subprocess.run(
        [sys.executable, "-c", STOPPING_USERS, str(REPO / "load_tests")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines == [
        "SoakHttpUser stopped",
        "SoakGrpcUser stopped",
        "SoakStreamUser stopped",
        "BadInputUser stopped",
        "fired [] next id 1",
    ], result.stdout
