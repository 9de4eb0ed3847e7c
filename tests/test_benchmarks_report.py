"""BENCHMARKS.md is what ``python bench/report.py`` renders from ``bench/results/*.json`` and
``bench/NOTES.md``: no number typed by hand, no result file added without regenerating it."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_md_is_the_report_of_the_result_files():
    spec = importlib.util.spec_from_file_location("dist8_bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    rendered = report.render(plots=False)
    committed = (ROOT / "BENCHMARKS.md").read_text()
    if rendered != committed:
        diff = next(i for i, (a, b) in enumerate(zip(rendered.splitlines(), committed.splitlines())) if a != b) \
            if any(a != b for a, b in zip(rendered.splitlines(), committed.splitlines())) else None
        line = f"first differing line {diff + 1}" if diff is not None else "one is a prefix of the other"
        raise AssertionError(f"BENCHMARKS.md differs from `python bench/report.py`'s output ({line}); "
                             "run `python bench/report.py` after changing bench/results or bench/NOTES.md")
