"""Every shipped example config is accepted by Envoy 1.40.0 (`--mode validate`) with our modules."""
import re
import subprocess

import pytest

from harness import ENVOY_BIN, MODULE_DIR, ROOT

# examples/compose is for Docker (image paths, service names); tests/test_dashboards.py checks it.
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*/envoy.yaml") if p.parent.name != "compose")
FILL = {"@MODULE_DIR@": str(MODULE_DIR), "@LOG_PATH@": "/dev/null", "@COLLECTOR@": "http://127.0.0.1:4317",
        "@METRICS_PORT@": "10003", "@LISTEN_PORT@": "10000", "@UPSTREAM_PORT@": "10001", "@ADMIN_PORT@": "10002"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.parent.name)
def test_example_validates(tmp_path, example):
    text = example.read_text()
    for k, v in FILL.items():
        text = text.replace(k, v)
    assert not re.search(r"@[A-Z_]+@", text), "unfilled placeholder"
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(text)
    p = subprocess.run([str(ENVOY_BIN), "--mode", "validate", "-c", str(cfg), "--use-dynamic-base-id"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "OK" in p.stdout + p.stderr
    # Nothing a later Envoy removes (or a site failing on deprecated fields rejects).
    assert "Deprecated field" not in p.stdout + p.stderr, re.findall(r".*Deprecated field.*", p.stdout + p.stderr)


def test_there_are_examples():
    assert len(EXAMPLES) >= 2
