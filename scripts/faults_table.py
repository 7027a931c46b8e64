#!/usr/bin/env python3
"""Prints the figures tests/test_faults.py recorded (.work/faults.json) as a Markdown table."""
import json
import pathlib
import sys

path = pathlib.Path(__file__).resolve().parents[1] / ".work" / "faults.json"
if not path.exists():
    sys.exit("no figures: run `make faults` first")
rows = json.loads(path.read_text())
print("| fault (steady load) | produced | delivered | dropped | failed | RSS growth | recovery |")
print("|---|---:|---:|---:|---:|---:|---:|")
for fault, f in rows.items():
    rss = f"{f['rss_growth_kb'] / 1024:.1f} MiB" if "rss_growth_kb" in f else "–"
    rec = f"{f['recovery_s']} s" if "recovery_s" in f else "–"
    print(f"| {fault} | {f['produced']:,} | {f['exported']:,} | {f['dropped']:,} | {f['failed']:,} | {rss} | {rec} |")
