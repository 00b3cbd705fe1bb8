"""Print a short table from a pytest-benchmark JSON file: GPU, dtype, shape, time, GB/s, ratio to each baseline."""

from __future__ import annotations

import json
import sys


def main(paths: list[str]) -> int:
    data = {"benchmarks": []}
    for path in paths:
        with open(path) as f:
            data["benchmarks"] += json.load(f)["benchmarks"]
    print("| test | device | dtype | shape | ms (median) | GB/s or TFLOP/s | ratios |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        ratios = ", ".join(f"{k[len('speedup_vs_'):]} {v:.2f}x" for k, v in info.items() if k.startswith("speedup_vs_"))
        mem = ", ".join(f"mem/{k[len('memory_ratio_vs_'):]} {v:.1f}x" for k, v in info.items()
                        if k.startswith("memory_ratio_vs_"))
        ratios = "; ".join(x for x in (ratios, mem) if x)
        gbps = info.get("gbps_triton", info.get("gbps_copy"))
        tflops = info.get("tflops_triton")
        rate = f"{gbps:.0f} GB/s" if gbps is not None else f"{tflops:.0f} TFLOP/s" if tflops is not None else "-"
        print(f"| {b['name']} | {info.get('device', '?')} | {info.get('dtype', '-')} | {info.get('shape', '-')} | "
              f"{b['stats']['median'] * 1e3:.3f} | {rate} | {ratios or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
