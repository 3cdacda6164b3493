"""Hydra helpers for sweeps run by several processes (joblib, submitit/SLURM launchers).

:class:`TorchThreads` is a Hydra callback the launcher configs in ``conf/hydra/launcher/`` install: it sets
each job's torch CPU threads in the job's own process, so parallel jobs do not oversubscribe the cores.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("fish_lightning")

#: thread-count variables read by native libraries that initialise after the job starts
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _int_or_none(name: str, value: Any, minimum: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"TorchThreads {name}={value!r} must be null or an integer{bound}")
    return value


class TorchThreads(Callback):
    """Set ``torch.set_num_threads`` (and the usual thread env variables) when each Hydra job starts.

    Args:
        threads: threads per job (``>= 1``); ``None``: derived from ``jobs``.
        jobs: jobs running at once on this machine (joblib's ``n_jobs``: ``-1`` = one per CPU,
            ``-2`` = all CPUs but one, ...). With ``threads=None`` each job gets
            ``max(1, available CPUs // jobs)`` threads. Both ``None``: the job keeps torch's default.
    """

    def __init__(self, threads: int | None = None, jobs: int | None = None) -> None:
        self.threads = _int_or_none("threads", threads, 1)
        self.jobs = _int_or_none("jobs", jobs, None)
        if self.jobs == 0:
            raise ValueError("TorchThreads jobs=0 is not valid: expected null, an integer >= 1, or -1, -2, ...")

    def resolve(self, cpus: int | None = None) -> int | None:
        """Threads each job gets on a machine with ``cpus`` CPUs (default: this process's), or ``None``."""
        if self.threads is not None:
            return self.threads
        if self.jobs is None:
            return None
        cpus = available_cpus() if cpus is None else cpus
        jobs = self.jobs if self.jobs > 0 else max(1, cpus + 1 + self.jobs)  # joblib's negative n_jobs
        return max(1, cpus // jobs)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        threads = self.resolve()
        if threads is None:
            return
        import torch

        torch.set_num_threads(threads)
        for var in THREAD_ENV_VARS:
            os.environ[var] = str(threads)
        if threads == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        log.info(f"torch threads per job: {torch.get_num_threads()} (pid {os.getpid()})")
