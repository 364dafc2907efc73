"""``RUN/report.json``: one record per stage run, appended; earlier records are never rewritten."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.files import write_text_atomically
from pipeline.stores import RunDir


def append_stage_record(run_dir: Path, record: dict) -> None:
    """Add ``record`` to the run's report, atomically (a crash leaves the previous report intact)."""
    path = RunDir(Path(run_dir)).report
    report = json.loads(path.read_text()) if path.is_file() else {"stages": []}
    report["stages"].append(record)
    write_text_atomically(path, json.dumps(report, indent=2))


def read_report(run_dir: Path) -> list[dict]:
    path = RunDir(Path(run_dir)).report
    return json.loads(path.read_text())["stages"] if path.is_file() else []
