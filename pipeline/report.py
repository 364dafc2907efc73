"""``RUN/report.json``: one record per stage run, appended; earlier records are never rewritten."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def append_stage_record(run_dir: Path, record: dict) -> None:
    """Add ``record`` to the run's report, atomically (a crash leaves the previous report intact)."""
    path = Path(run_dir) / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {"stages": []}
    report["stages"].append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".report.{uuid.uuid4().hex}.tmp")
    temporary.write_text(json.dumps(report, indent=2))
    os.replace(temporary, path)


def read_report(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "report.json"
    return json.loads(path.read_text())["stages"] if path.is_file() else []
