"""Curves of a run: ``python -m training.plot RUN [--out FILE]`` writes RUN/curves.png (loss, distill's raw
squared errors, and the validation metrics of ``--sample-every`` runs, against steps) from RUN/log.jsonl. Needs
matplotlib (``pip install 'mfsr-fast[train]'``)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_log(run: str) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows) of RUN/log.jsonl; a torn last line (a killed run) is skipped."""
    path = os.path.join(run, "log.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run}: no log.jsonl (is it a training run's output folder?)")
    train, val = [], []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("kind") == "val":
                val.append(rec)
            elif "loss" in rec:  # not the rows that record a resumed run's overrides
                train.append(rec)
    if not train and not val:
        raise ValueError(f"{path}: no rows yet")
    return train, val


def _smooth(values: list[float], n: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):  # running mean over the last n rows
        acc += v - (values[i - n] if i >= n else 0.0)
        out.append(acc / min(i + 1, n))
    return out


def plot_run(run: str, out: str | None = None) -> str:
    """Write the curves PNG (default RUN/curves.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_log(run)
    order = {"psnr_y": 0, "ssim_y": 1, "niqe": 2}
    metrics = sorted({k.split("@")[0] for r in val for k in r if "@" in k}, key=lambda m: (order.get(m, 3), m))
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(4.2 * (1 + len(metrics)), 3.4), squeeze=False)
    ax = axes[0][0]
    if train:
        steps, loss = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, loss, color="0.75", lw=0.8, label="loss")
        ax.plot(steps, _smooth(loss, 10), color="C0", lw=1.5, label="running mean (10 rows)")
        ax.legend(fontsize=8)
    ax.ticklabel_format(axis="y", useOffset=False)  # MeanFlow's adaptive loss sits near 1: show the values
    ax.set(title="training loss", xlabel="step")
    ax.grid(alpha=0.3)
    parts = sorted({k for r in train for k in r if k.startswith("mse")})
    if parts:  # distill's raw squared errors, on their own axis (log scale): the adaptive loss hides their trend
        ax2 = ax.twinx()
        for i, k in enumerate(parts):
            pts = [(r["step"], r[k]) for r in train if k in r]
            ax2.plot(*zip(*pts), color=f"C{i + 1}", lw=1.0, label=k)
        ax2.set_yscale("log")
        ax2.set_ylabel("mean squared error per element")
        ax2.legend(fontsize=8, loc="lower left")
    for ax, name in zip(axes[0][1:], metrics):
        keys = sorted({k for r in val for k in r if k.split("@")[0] == name}, key=lambda k: int(k.split("@")[1]))
        for k in keys:
            pts = [(r["step"], r[k]) for r in val if k in r]
            n = int(k.split("@")[1])
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"{n} step{'s' if n > 1 else ''}")
        pretty = {"psnr_y": "PSNR-Y (dB, higher is better)", "ssim_y": "SSIM-Y (higher is better)",
                  "niqe": "NIQE (lower is better)"}.get(name, name)
        ax.set(title=pretty, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.normpath(run)), fontsize=10)
    fig.tight_layout()
    out = out or os.path.join(run, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a training run's output folder (with log.jsonl)")
    ap.add_argument("--out", default=None, help="PNG path (default RUN/curves.png)")
    args = ap.parse_args(argv)
    try:
        path = plot_run(args.run, args.out)
    except ImportError:
        print("training.plot needs matplotlib: pip install 'mfsr-fast[train]'", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"training.plot: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
