"""Training metrics of rank 0: metrics.jsonl (one object per logged step), metrics.csv and
TensorBoard events in the run directory (for an S3 run directory: written locally, uploaded at
every checkpoint and at the end)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from typing import Dict, List

from hncl.infra import storage, tempfiles

_SHOWN = ("loss", "loss_view", "loss_nn", "nn_purity", "queue_fill", "lr", "images_per_s", "skipped")


class MetricsLog:
    def __init__(self, run_dir: str, enabled: bool = True):
        self.run_dir, self.enabled = run_dir, enabled
        self.records: List[Dict] = []
        self._tb = None
        self._purge_step = None
        if not enabled:
            return
        self.remote = storage.is_remote(run_dir)
        self.local = tempfiles.mkdtemp("metrics") if self.remote else run_dir
        os.makedirs(self.local, exist_ok=True)
        url = storage.join(run_dir, "metrics.jsonl")
        if storage.exists(url):  # a resumed run continues its log
            self.records = [json.loads(l) for l in storage.read_bytes(url).decode().splitlines() if l.strip()]
        self._rewrite()

    def _rewrite(self) -> None:
        with open(os.path.join(self.local, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)

    def truncate_after(self, step: int) -> None:
        """Drop records logged after the checkpoint a run resumes from (they will be redone)."""
        if self.enabled:
            self.records = [r for r in self.records if r["step"] <= step]
            self._rewrite()
            self._purge_step = step + 1  # TensorBoard drops the abandoned steps' events too

    def write(self, metrics: Dict) -> None:
        if not self.enabled:
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
        self.records.append(record)
        with open(os.path.join(self.local, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.local, "tensorboard"), purge_step=self._purge_step)
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self._tb.add_scalar(k, v, record["step"])
        shown = "  ".join(f"{k} {record[k]:.4g}" for k in _SHOWN if isinstance(record.get(k), (int, float)))
        print(f"[hncl] step {record['step']}  {shown}", file=sys.stderr, flush=True)

    def flush(self) -> None:
        if not self.enabled:
            return
        keys = sorted({k for r in self.records for k in r})
        with open(os.path.join(self.local, "metrics.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.records)
        if self._tb is not None:
            self._tb.flush()
        if self.remote:
            storage.upload_dir(self.local, self.run_dir, keep=True)

    def discard(self) -> None:
        """Close without uploading; remove the local copy of an S3 run directory's metrics."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.enabled and self.remote:
            shutil.rmtree(self.local, ignore_errors=True)

    def close(self) -> None:
        if self._tb is not None:  # its events on disk before the upload
            self._tb.close()
            self._tb = None
        self.flush()
        self.discard()
