"""Print a short table from pytest-benchmark JSON files: GPU, dtype, shape, time, GB/s or TFLOP/s, peak memory and
the ratio to each baseline. The time is the Triton path's median from the test's own timing (``ms_triton``) where the
test recorded one, else pytest-benchmark's median. Forward GB/s is also given as a share of the measured copy
bandwidth when the copy benchmark ran."""

from __future__ import annotations

import json
import sys


def _fmt_ratio(info: dict, prefix: str, fmt: str) -> list[str]:
    return [fmt.format(k[len(prefix):], v) for k, v in info.items() if k.startswith(prefix) and isinstance(v, float)]


def main(paths: list[str]) -> int:
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                rows += json.load(f)["benchmarks"]
        except (OSError, ValueError, KeyError) as e:
            print(f"(skipped {path}: {e})")
    copy = next((b["extra_info"]["gbps_copy"] for b in rows if "gbps_copy" in b.get("extra_info", {})), None)
    gcopy = next((b["extra_info"]["gpu_gbps_copy"] for b in rows if "gpu_gbps_copy" in b.get("extra_info", {})), None)
    print("| test | device | dtype | shape | ms (median) | GB/s or TFLOP/s | peak MiB | ratios (baseline / ours) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for b in rows:
        info = b.get("extra_info", {})
        ms = info.get("ms_triton", b["stats"]["median"] * 1e3)
        ratios = _fmt_ratio(info, "speedup_vs_", "{} {:.2f}x")
        ratios += _fmt_ratio(info, "memory_ratio_vs_", "mem {} {:.1f}x")
        ratios += [f"{k[3:]} OOM" for k, v in info.items() if k.startswith("ms_") and v == "OOM"]
        gbps = info.get("gbps_triton", info.get("gbps_copy"))
        tflops = info.get("tflops_triton")
        if gbps is not None:
            rate = f"{gbps:.0f} GB/s"
            if copy and "gbps_triton" in info:
                rate += f" ({100 * gbps / copy:.0f}% of copy)"
            g = info.get("gpu_gbps_triton", info.get("gpu_gbps_copy"))
            if isinstance(g, float):
                rate += f"; GPU time {g:.0f} GB/s" + (f" ({100 * g / gcopy:.0f}% of copy)" if gcopy and
                                                       "gpu_gbps_triton" in info else "")
                ratios += _fmt_ratio(info, "gpu_speedup_vs_", "GPU time: {} {:.2f}x")
        else:
            rate = f"{tflops:.0f} TFLOP/s" if tflops is not None else "-"
            if isinstance(info.get("gpu_tflops_triton"), float):
                rate += f"; GPU time {info['gpu_ms_triton']:.3f} ms, {info['gpu_tflops_triton']:.0f} TFLOP/s"
        peak = info.get("peak_mb_triton")
        peak = f"{peak:.0f}" if isinstance(peak, float) else "-"
        print(f"| {b['name']} | {info.get('device', '?')} | {info.get('dtype', '-')} | {info.get('shape', '-')} | "
              f"{ms:.3f} | {rate} | {peak} | {', '.join(ratios) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
