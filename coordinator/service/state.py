"""What the server remembers across restarts, under its state dir: job records and model versions.

    state-dir/
      jobs/<job id>.json       one record per job: its request, state, latest progress, error
      versions/v000042.pt      a published model version: weights, labels, preprocessing, shape

Every file is written to a temporary name and renamed into place, so a server killed mid-write
leaves the previous file whole. Versions are read with torch.load(weights_only=True). Both are
bounded: the last `keep_versions` versions plus those pinned by number, and the last `keep_jobs`
ended jobs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from coordinator.data import ColourStats
from coordinator.service.versions import ModelVersion
from coordinator.training.checkpoints import write_atomically

log = logging.getLogger(__name__)


def default_state_dir() -> Path:
    """$XDG_DATA_HOME/alexnet-mp/state, or ~/.local/share/alexnet-mp/state."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "alexnet-mp" / "state"


class StateStore:
    def __init__(self, root, keep_versions: int = 5, keep_jobs: int = 1000, pinned=()):
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
        self.root, self.pinned = Path(root), frozenset(int(v) for v in pinned)  # versions never pruned
        self.jobs_dir, self.versions_dir = self.root / "jobs", self.root / "versions"
        self.keep_versions, self.keep_jobs = keep_versions, keep_jobs
        for folder in (self.jobs_dir, self.versions_dir):
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("*.tmp"):  # left by a server killed while writing
                stale.unlink()

    # --- jobs --------------------------------------------------------------------------------------
    def save_job(self, record: dict) -> None:
        write_atomically(self.jobs_dir / f"{record['job_id']}.json", lambda tmp: tmp.write_text(json.dumps(record)))

    def load_jobs(self) -> list[dict]:
        """Every readable job record (an unreadable one is logged and left in place)."""
        records = []
        for path in self.jobs_dir.glob("*.json"):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                log.warning("skipping unreadable job record %s: %s", path, exc)
        return records

    def prune_jobs(self, ended: list[str]) -> None:
        """Forget all but the last `keep_jobs` of these ended jobs (oldest first)."""
        for job_id in ended[: max(0, len(ended) - self.keep_jobs)]:
            (self.jobs_dir / f"{job_id}.json").unlink(missing_ok=True)

    # --- model versions ------------------------------------------------------------------------------
    def save_version(self, version: ModelVersion) -> None:
        payload = {
            "version": version.version,
            "state": version.state,
            "labels": list(version.labels),
            "stats": dataclasses.asdict(version.stats),
            "normalise": version.normalise,
            "net": dict(version.net),
        }
        write_atomically(self.versions_dir / f"v{version.version:06d}.pt", lambda tmp: torch.save(payload, tmp))
        unpinned = [path for path in self._version_files() if int(path.stem[1:]) not in self.pinned]
        for old in unpinned[: -self.keep_versions]:
            old.unlink(missing_ok=True)

    def latest_version(self) -> Optional[ModelVersion]:
        """The newest readable version kept here, or None."""
        for path in reversed(self._version_files()):
            version = self._read_version(path)
            if version is not None:
                return version
        return None

    def load_version(self, number: int) -> Optional[ModelVersion]:
        """That version, if it is kept here and readable; else None."""
        path = self.versions_dir / f"v{number:06d}.pt"
        return self._read_version(path) if path.is_file() else None

    @staticmethod
    def _read_version(path: Path) -> Optional[ModelVersion]:
        try:
            p = torch.load(path, map_location="cpu", weights_only=True)
            stats = ColourStats(**p["stats"])
            return ModelVersion(p["version"], p["state"], p["labels"], stats, p["normalise"], p["net"])
        except Exception as exc:  # a damaged file: the caller falls back, or answers that it is not here
            log.warning("skipping unreadable model version %s: %s", path, exc)
            return None

    def _version_files(self) -> list[Path]:
        """Every kept version, oldest first."""
        return sorted(self.versions_dir.glob("v[0-9]*.pt"))
