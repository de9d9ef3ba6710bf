"""Where a worker's checkpoints go and come from: Ray Train, or a plain run directory.

Every rank writes its own files (rank-suffixed where all ranks write: Ray Train keeps one file
per name when it merges the workers' checkpoint folders) into a local folder and commits it:
- RaySession: `ray.train.report(checkpoint=...)`; Ray uploads and merges them, keeps the newest
  `keep` and hands the latest back after a worker failure or a rerun with the same run name.
- LocalSession (debug mode, torchrun): run_dir/checkpoint_NNNNNNNN/, local or S3; a checkpoint
  counts only once rank 0 has written its `_COMPLETE` marker after every rank finished. A folder
  without the marker (an upload that failed) is removed when the run resumes.
Local copies (a checkpoint being written, a downloaded one being restored) are temporary
folders, removed after use whatever happens.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import re
import shutil
from typing import Callable, Dict, Iterator, Optional

import torch.distributed as dist

from hncl.core import dist as hdist
from hncl.infra import storage, tempfiles

COMPLETE = "_COMPLETE"
log = logging.getLogger(__name__)
_CKPT = re.compile(r"^checkpoint_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def step_of(path: str) -> Optional[int]:
    m = _CKPT.match(os.path.basename(path.rstrip("/")))
    return int(m.group(1)) if m else None


def discard_after(run_dir: str, step: Optional[int]) -> None:
    """Remove the checkpoint folders of `run_dir` after `step` (all of them for None): Ray Train
    resumes from its latest committed checkpoint, so a later folder is one it never committed (a
    save cut off by a failure). Left there, the run's next save to that name would be merged into
    it by Ray (stale rank files of another world size, say) and fail the restore after it."""
    for name in storage.listdir(run_dir):
        later = step_of(name)
        if later is not None and (step is None or later > step):
            log.info("removing %s: a checkpoint Ray Train never committed", storage.join(run_dir, name))
            storage.remove(storage.join(run_dir, name), recursive=True)


class Session(abc.ABC):
    def __init__(self, run_dir: str):
        self.run_dir = run_dir.rstrip("/")
        self.rank, self.world_size = hdist.rank(), hdist.world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))

    @abc.abstractmethod
    def restore_dir(self) -> Optional[str]:
        """A local folder holding every rank's files of the latest checkpoint, or None."""

    @contextlib.contextmanager
    def restored(self) -> Iterator[Optional[str]]:
        """restore_dir() for the block; a downloaded copy is removed afterwards."""
        folder = self.restore_dir()
        try:
            yield folder
        finally:
            if folder is not None and self._is_temporary(folder):
                shutil.rmtree(folder, ignore_errors=True)

    def _is_temporary(self, folder: str) -> bool:
        return os.path.basename(folder).startswith("hncl-restore-")

    @abc.abstractmethod
    def save(self, step: int, write: Callable[[str], None], metrics: Dict[str, float]) -> None:
        """Collective: every rank writes its files with write(folder), then they are committed."""

    def report_metrics(self, metrics: Dict[str, float]) -> None:
        """Collective: metrics for the cluster's view of the run (Ray Train); files are rank 0's job."""

    def barrier(self) -> None:
        if hdist.is_distributed():
            dist.barrier()


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report (the whole metrics dict) at INFO under a logger named by its
    module's file; our own progress line already says the same, once."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: its noise stays, nothing breaks
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class RaySession(Session):
    def __init__(self, run_dir: str):
        super().__init__(run_dir)
        import ray.train

        self._train = ray.train
        _quiet_ray_train_reports()

    def restore_dir(self) -> Optional[str]:
        ckpt = self._train.get_checkpoint()
        if self.rank == 0:
            discard_after(self.run_dir, step_of(ckpt.path) if ckpt is not None else None)
        self.barrier()  # no rank saves into a folder before it is gone
        if ckpt is None:
            return None
        # a folder of our own: ranks on one node must not share (and overwrite) a download that
        # another rank is reading
        return ckpt.to_directory(tempfiles.mkdtemp("restore"))

    def report_metrics(self, metrics: Dict[str, float]) -> None:
        self._train.report(metrics)

    def save(self, step: int, write: Callable[[str], None], metrics: Dict[str, float]) -> None:
        folder = tempfiles.mkdtemp("ckpt")
        try:
            write(folder)
            self._train.report(metrics, checkpoint=self._train.Checkpoint.from_directory(folder),
                               checkpoint_dir_name=checkpoint_name(step), delete_local_checkpoint_after_upload=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


class LocalSession(Session):
    def __init__(self, run_dir: str, keep: int = 2):
        super().__init__(run_dir)
        self.keep = keep
        self._downloaded: Optional[str] = None

    def _complete(self):
        names = storage.listdir(self.run_dir)
        steps = []
        for n in names:
            m = _CKPT.match(n)
            if m and COMPLETE in storage.listdir(storage.join(self.run_dir, n)):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def _incomplete(self):
        names = storage.listdir(self.run_dir)
        return [n for n in names if _CKPT.match(n) and COMPLETE not in storage.listdir(storage.join(self.run_dir, n))]

    def restore_dir(self) -> Optional[str]:
        steps = self._complete()
        self.barrier()  # every rank has chosen before rank 0 tidies up
        if self.rank == 0:
            for name in self._incomplete():  # an abandoned save: never a checkpoint, now garbage
                storage.remove(storage.join(self.run_dir, name), recursive=True)
        if not steps:
            return None
        url = storage.join(self.run_dir, checkpoint_name(steps[-1]))
        if not storage.is_remote(url):
            return url
        local = tempfiles.mkdtemp("restore")
        try:
            storage.get_dir(url, local)
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise
        return local

    def save(self, step: int, write: Callable[[str], None], metrics: Dict[str, float]) -> None:
        url = storage.join(self.run_dir, checkpoint_name(step))
        folder = tempfiles.mkdtemp("ckpt")
        try:
            write(folder)
            storage.upload_dir(folder, url)  # DeepSpeed's sub-folder per tag included
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.barrier()  # every rank's files are in place
        if self.rank == 0:
            storage.write_bytes(storage.join(url, COMPLETE), b"")
            for old in self._complete()[:-self.keep]:
                storage.remove(storage.join(self.run_dir, checkpoint_name(old)), recursive=True)
        self.barrier()
