"""Raw benchmark rows as CSV, and the Markdown tables of docs/results made from them.

Every measured number the results pages show lives in ``benchmarks/results/<question>.csv``, one row per number:
``what,metric,value,machine,commit,date`` (``what``: the method or setting and the data it ran on). Two commands:

- ``python benchmarks/tables.py from-md TABLE.md --what-prefix 'DRealSR x4, 93 pairs: ' --machine M --commit C
  --date D``: the rows of a Markdown table (the evaluation's ``--output``: one row per method, a column per metric) as
  CSV lines on stdout, to append to a results file;
- ``python benchmarks/tables.py to-md FILE.csv [--metrics a,b,...]``: the table back as Markdown (a row per ``what``,
  a column per metric, in the order they first appear), under the conditions line(s) its rows record.
"""

from __future__ import annotations

import argparse
import csv
import sys

FIELDS = ["what", "metric", "value", "machine", "commit", "date"]


def md_rows(path: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table in ``path`` as {column: cell}."""
    lines = [ln.strip() for ln in open(path) if ln.strip().startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    header, body = cells[0], [c for c in cells[2:] if len(c) == len(cells[0])]
    return [dict(zip(header, row)) for row in body]


def from_md(args) -> int:
    out = csv.writer(sys.stdout)
    for row in md_rows(args.table):
        name = row.pop(next(iter(row)))  # the first column names the row
        for metric, value in row.items():
            if value not in ("", "-"):
                out.writerow([args.what_prefix + name, metric, value, args.machine, args.commit, args.date])
    return 0


def to_md(args) -> int:
    rows = list(csv.DictReader(open(args.csv)))
    if not rows or list(rows[0]) != FIELDS:
        raise SystemExit(f"{args.csv}: expected the columns {','.join(FIELDS)}")
    whats = list(dict.fromkeys(r["what"] for r in rows))
    metrics = args.metrics.split(",") if args.metrics else list(dict.fromkeys(r["metric"] for r in rows))
    value = {(r["what"], r["metric"]): r["value"] for r in rows}
    for cond in dict.fromkeys((r["machine"], r["date"], r["commit"]) for r in rows):
        print(f"Conditions: {cond[0]}; {cond[1]}; commit {cond[2]}.")
    print()
    print("| | " + " | ".join(metrics) + " |")
    print("| --- " * (len(metrics) + 1) + "|")
    for what in whats:
        print(f"| {what} | " + " | ".join(value.get((what, m), "") for m in metrics) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("from-md", help="a Markdown table's rows as CSV lines")
    a.add_argument("table")
    a.add_argument("--what-prefix", default="")
    a.add_argument("--machine", required=True)
    a.add_argument("--commit", required=True)
    a.add_argument("--date", required=True)
    b = sub.add_parser("to-md", help="a results CSV as a Markdown table")
    b.add_argument("csv")
    b.add_argument("--metrics", default="", help="the columns, comma-separated (default: all, as they appear)")
    args = ap.parse_args(argv)
    return from_md(args) if args.cmd == "from-md" else to_md(args)


if __name__ == "__main__":
    sys.exit(main())
