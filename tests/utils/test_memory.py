import subprocess
import sys

from modelpress.utils.memory import peak_rss_bytes, rss_bytes


def test_a_child_reports_its_own_peak_not_its_parents():
    """Linux carries getrusage's ru_maxrss across exec: a child of a big test runner would report
    the runner's size as its own peak (a streamed-memory test failed in CI that way)."""
    ballast = bytearray(1_500_000_000)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page: resident
    assert rss_bytes() > 1_500_000_000
    code = "from modelpress.utils.memory import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del ballast
    assert 0 < child < 1_000_000_000
    assert peak_rss_bytes() >= rss_bytes()
