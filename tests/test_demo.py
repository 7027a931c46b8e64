"""`make demo`'s script runs the whole pack non-interactively and reports what it saw."""
import re
import subprocess
import sys

from harness import ROOT


def test_demo_runs_end_to_end_and_reports_every_signal():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--duration", "4"],
                       capture_output=True, text=True, timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "demo OK" in out

    def number(label):
        m = re.search(rf"{label}\s+(\d+)", out)
        assert m, f"{label!r} missing from the summary:\n{out[-2000:]}"
        return int(m.group(1))
    assert number("JSON log lines") > 0 and number("OTLP log records") > 0
    assert number("spans") > 0 and number("Prometheus series") > 0
    assert "ABI version v0.2.0 matched" in out or "v0.2.0" in out


def test_demo_stops_cleanly_on_interrupt():
    import signal
    import time
    p = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo.py"), "--duration", "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(5)
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 130 and "interrupted; stopping" in out, out[-2000:]
    left = subprocess.run(["pgrep", "-f", str(ROOT / ".work" / "demo")], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes left running: {left}"
