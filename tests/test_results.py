"""The results pages and their raw rows agree: every ``benchmarks/results/<question>.csv`` has the columns of
``benchmarks/tables.py``, a page ``docs/results/<question>.md`` that names it, and the page shows its quality numbers;
``tables.py`` turns a page's table into rows and rows back into a table."""

from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ["what", "metric", "value", "machine", "commit", "date"]
SHOWN = ("PSNR-Y", "SSIM-Y", "NIQE")  # the metrics every page that has them must show as stored
CSVS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.csv")))


def _tables(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tables.py"), *args],
                          capture_output=True, text=True)


def test_there_are_results():
    assert len(CSVS) >= 5


@pytest.mark.parametrize("path", CSVS, ids=os.path.basename)
def test_a_results_file_has_its_page_and_the_page_its_numbers(path):
    rows = list(csv.DictReader(open(path)))
    assert rows and list(rows[0]) == FIELDS
    assert all(all(r[k] for k in FIELDS) for r in rows), "a row with an empty field"
    name = os.path.splitext(os.path.basename(path))[0]
    page = os.path.join(ROOT, "docs", "results", f"{name}.md")
    text = open(page).read()
    assert f"benchmarks/results/{name}.csv" in text
    missing = [f"{r['what']} {r['metric']} {r['value']}" for r in rows
               if r["metric"] in SHOWN and f" {r['value']} " not in text]
    assert not missing, f"{page} does not show {missing[:5]}"


def test_tables_round_trip(tmp_path):
    table = tmp_path / "t.md"
    table.write_text("| method | PSNR-Y | NIQE |\n| --- | --- | --- |\n"
                     "| bicubic | 30.54 | 10.835 |\n| R | 28.65 | - |\n")
    made = _tables("from-md", str(table), "--what-prefix", "set: ", "--machine", "cpu", "--commit", "abc",
                   "--date", "2026-01-01")
    assert made.returncode == 0, made.stderr
    rows = list(csv.reader(made.stdout.splitlines()))
    assert rows == [["set: bicubic", "PSNR-Y", "30.54", "cpu", "abc", "2026-01-01"],
                    ["set: bicubic", "NIQE", "10.835", "cpu", "abc", "2026-01-01"],
                    ["set: R", "PSNR-Y", "28.65", "cpu", "abc", "2026-01-01"]]  # "-" is no number
    rows_csv = tmp_path / "rows.csv"
    rows_csv.write_text(",".join(FIELDS) + "\n" + made.stdout)
    back = _tables("to-md", str(rows_csv))
    assert back.returncode == 0, back.stderr
    assert "Conditions: cpu; 2026-01-01; commit abc." in back.stdout
    assert "| set: bicubic | 30.54 | 10.835 |" in back.stdout and "| set: R | 28.65 |  |" in back.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    refused = _tables("to-md", str(bad))
    assert refused.returncode != 0 and "expected the columns" in refused.stderr
