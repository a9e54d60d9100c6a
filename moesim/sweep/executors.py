"""Where sweep points run: in this process, in a local process pool, or as Ray tasks.

Every executor takes the same picklable tasks, calls the same module-level function on each, and
yields ``(task index, row)`` as points finish (in completion order), so the runner writes the same
table whichever ran them. Ray is optional (``pip install moesim[ray]``) and imported only here,
only when asked for.

Local workers never outlive the sweep: if the sweep stops early (an exception, Ctrl-C, a SIGTERM
the CLI turns into an exit) they are terminated, then killed; if the sweep's process is killed
outright (SIGKILL), each worker gets SIGKILL from the kernel (Linux ``PR_SET_PDEATHSIG``), or,
elsewhere, a watchdog thread in the worker notices that its parent is gone and exits.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from moesim.errors import MoESimError

__all__ = ["EXECUTORS", "check_options", "run_tasks", "run_inline", "run_local", "run_ray"]

EXECUTORS = ("local", "ray")

# CPUs of the Ray instance started when no address is given: this machine's share of the work.
LOCAL_RAY_CPUS = 2

Task = Any            # a picklable argument of ``fn``
Done = tuple[int, dict[str, Any]]


def run_tasks(fn: Callable[[Task], dict[str, Any]], tasks: Sequence[Task], *,
              executor: str = "local", jobs: int = 1, address: str | None = None
              ) -> Generator[Done, None, None]:
    """Run ``fn(task)`` for every task; yield ``(index in tasks, result)`` as each finishes.

    Raises
    ------
    MoESimError
        Bad options (:func:`check_options`), or Ray asked for but not installed / not reachable.
    """
    check_options(executor, jobs, address)
    if executor == "local":
        return run_inline(fn, tasks) if jobs == 1 else run_local(fn, tasks, jobs)
    return run_ray(fn, tasks, address=address, jobs=jobs)


def check_options(executor: str, jobs: int, address: str | None) -> None:
    """Refuse an unknown executor, jobs < 1, or an ``address`` without Ray (MoESimError); a
    sweep calls this before it creates its output folder."""
    if executor not in EXECUTORS:
        raise MoESimError(f"--executor: unknown executor {executor!r} (allowed: "
                          f"{', '.join(EXECUTORS)})")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise MoESimError(f"-j/--jobs: {jobs!r} is not allowed (a number of worker processes, "
                          ">= 1)")
    if address is not None and executor != "ray":
        raise MoESimError(f"--address {address[:60]!r} needs --executor ray (it is the Ray "
                          "cluster to run on; the local executor runs on this machine)")
    if address is not None and not address.strip():
        raise MoESimError("--address: must not be empty (a Ray cluster address such as "
                          "ray://head:10001; leave it out to start a local Ray)")


def run_inline(fn: Callable[[Task], dict[str, Any]], tasks: Sequence[Task]
               ) -> Generator[Done, None, None]:
    """Run the tasks one by one in this process (``-j 1``: no pool start-up, easy to debug)."""
    for i, task in enumerate(tasks):
        yield i, fn(task)


def run_local(fn: Callable[[Task], dict[str, Any]], tasks: Sequence[Task], jobs: int
              ) -> Generator[Done, None, None]:
    """Run the tasks on a pool of ``jobs`` local processes; none outlives this generator."""
    pool = ProcessPoolExecutor(max_workers=min(jobs, max(1, len(tasks))),
                               initializer=_worker_init, initargs=(os.getpid(),))
    completed = False
    try:
        pending = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                yield pending.pop(future), future.result()
        completed = True
    finally:
        if completed:
            pool.shutdown(wait=True)
        else:  # interrupted or a bug in one point: stop every worker now, not after its point
            _stop_pool(pool)


def _stop_pool(pool: ProcessPoolExecutor, grace: float = 2.0) -> None:
    """Cancel what has not started and end the workers: SIGTERM, then SIGKILL after ``grace``."""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in workers:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in workers:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)


def _worker_init(parent: int) -> None:
    """In each worker: leave Ctrl-C to the parent, die on SIGTERM, and die with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent stops us after Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not _die_with_parent():
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True,
                         name="moesim-parent-watchdog").start()
    if os.getppid() != parent:                       # the parent died before we got here
        os._exit(1)


def _die_with_parent() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, period: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(period)
    os._exit(1)


def run_ray(fn: Callable[[Task], dict[str, Any]], tasks: Sequence[Task], *,
            address: str | None = None, jobs: int = 1) -> Generator[Done, None, None]:
    """Run the tasks as Ray tasks, on the cluster at ``address`` or on a local Ray instance.

    At most ``max(jobs, cluster CPUs)`` tasks are in flight, so an interrupted sweep leaves little
    running. A Ray instance this function started is shut down when it finishes.
    """
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        _init_ray(ray, address)
    in_flight: dict[Any, int] = {}
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(fn)
        limit = max(jobs, int(ray.cluster_resources().get("CPU", 1)))
        todo = list(enumerate(tasks))[::-1]
        while todo or in_flight:
            while todo and len(in_flight) < limit:
                i, task = todo.pop()
                in_flight[remote.remote(task)] = i
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                yield in_flight.pop(ref), _ray_get(ray, ref)
    finally:
        for ref in in_flight:
            ray.cancel(ref)
        if started:
            ray.shutdown()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MoESimError("the Ray executor needs Ray: pip install 'moesim[ray]'") from None
    return ray


def _init_ray(ray, address: str | None) -> None:
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=LOCAL_RAY_CPUS, include_dashboard=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at {address}" if address else "locally"
        raise MoESimError(f"cannot start or reach a Ray cluster {where}: {exc}") from None


def _ray_get(ray, ref) -> dict[str, Any]:
    """The task's result; a task's own exception is re-raised as itself, not as a RayTaskError."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.as_instanceof_cause()
        raise (getattr(cause, "cause", None) or cause) from None
