"""Run every benchmark with one size preset, then regenerate BENCHMARKS.md.

    python bench/run_all.py --quick     # < 10 min on 2 CPU cores (target)
    python bench/run_all.py --full      # a real machine

Each benchmark writes bench/results/<name>-<host>.json; a combined
bench/results/<host>-<date>.json is written at the end.
"""
from __future__ import annotations

import argparse
import datetime
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="small sizes (default)")
    group.add_argument("--full", action="store_true")
    parser.add_argument("--only", nargs="+", default=["step", "sharded", "checkpoint", "convergence", "memory",
                                                      "accuracy"])
    args = parser.parse_args()
    preset = "--full" if args.full else "--quick"
    host = socket.gethostname()
    commands = {
        "step": [sys.executable, str(HERE / "step.py"), "--device", "cpu",
                 "--sizes", "1M,16M,64M,256M" if args.full else "1M,16M", "--dtypes", "fp32,bf16" if args.full else "fp32",
                 "--out", str(HERE / "results" / f"step-{host}.json")],
        "sharded": [sys.executable, str(HERE / "sharded.py"), preset],
        "checkpoint": [sys.executable, str(HERE / "checkpoint.py"), preset],
        "convergence": [sys.executable, str(HERE / "convergence.py"), preset]
        + ([] if args.full else ["--steps", "200", "--seeds", "0", "1", "2"]),
        "memory": [sys.executable, str(HERE / "memory.py")] + (["--world-sizes", "2", "4"] if args.full else []),
        "accuracy": [sys.executable, str(HERE / "accuracy.py")] + ([] if args.full else ["--seeds", "3"]),
    }
    timings = {}
    for name in args.only:
        t0 = time.perf_counter()
        print(f"== {name}: {' '.join(commands[name][1:])}", flush=True)
        subprocess.run(commands[name], check=True)
        timings[name] = time.perf_counter() - t0
    combined = {"timings_s": timings}
    for name in args.only:
        f = HERE / "results" / f"{name}-{host}.json"
        if args.full and (HERE / "results" / f"{name}-full-{host}.json").exists():
            f = HERE / "results" / f"{name}-full-{host}.json"  # sharded/checkpoint --full write their own file
        if f.exists():
            combined[name] = json.loads(f.read_text())
    out = HERE / "results" / f"{host}-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(combined, indent=1, default=str))
    print(f"wrote {out}; timings {timings}")
    subprocess.run([sys.executable, str(HERE / "report.py")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
