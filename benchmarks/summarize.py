"""Print a short table from a pytest-benchmark JSON file: GPU, dtype, shape, time, GB/s, ratio to each baseline."""

from __future__ import annotations

import json
import sys


def main(path: str) -> int:
    with open(path) as f:
        data = json.load(f)
    print("| test | device | dtype | shape | ms (median) | GB/s | ratios |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        ratios = ", ".join(f"{k[len('speedup_vs_'):]} {v:.2f}x" for k, v in info.items() if k.startswith("speedup_vs_"))
        gbps = info.get("gbps_triton", info.get("gbps_copy"))
        print(f"| {b['name']} | {info.get('device', '?')} | {info.get('dtype', '-')} | {info.get('shape', '-')} | "
              f"{b['stats']['median'] * 1e3:.3f} | {'-' if gbps is None else f'{gbps:.0f}'} | {ratios or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
