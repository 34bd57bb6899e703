"""The worker the console commands start, or the one they leave the queue to.

`easel imagine`, `edit`, `inpaint` and `chat` submit their jobs and follow them. When `easel serve` or
`easel worker` already serves the same data folder, that worker runs them; otherwise they start one
of their own for as long as they run (and if the long-running one stops meanwhile, they start theirs
then).

A long-running worker says it is alive by holding a shared lock on `<data_dir>/worker.lock` for as
long as it runs; the operating system lets go of it when the process ends, however it ends, so
there is no heartbeat to go stale. A console command asks by trying an exclusive lock without
waiting (probes take turns on `worker-probe.lock`, so that two probes never mistake each other for a
worker). This sees workers on this machine sharing the data folder, which is also where the images
they store must be for the console to copy them; a worker on another host, sharing only a
PostgreSQL database, is not seen, and the console runs its own worker beside it as before.

    with announce_worker(settings):       # easel serve, easel worker
        await worker.run()
    async with serving_the_queue(core):   # easel imagine, easel chat
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import importlib
import logging
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from bot.bootstrap import Core
from bot.config import Settings

log = logging.getLogger("easel")

LOCK_NAME = "worker.lock"
PROBE_LOCK_NAME = "worker-probe.lock"
RECHECK_S = 1.0  # while following another process's worker, how often to check it still runs


@contextlib.contextmanager
def announce_worker(settings: Settings) -> Iterator[None]:
    """Tell console commands on this data folder that a worker serves the queue while the body runs."""
    path = _lock_path(settings, LOCK_NAME)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # waits only while a probe looks (microseconds)
        yield


def a_worker_is_running(settings: Settings) -> bool:
    """Whether `easel serve` or `easel worker` serves the queue of this data folder now."""
    with _lock_path(settings, PROBE_LOCK_NAME).open("a") as probe, \
            _lock_path(settings, LOCK_NAME).open("a") as lock:
        fcntl.flock(probe, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def _lock_path(settings: Settings, name: str) -> Path:
    folder = settings.storage.data_dir
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


@contextlib.asynccontextmanager
async def serving_the_queue(core: Core, *, debug: bool = False, out: TextIO = sys.stderr) -> AsyncIterator[None]:
    """While the body runs, someone serves the queue: the worker of `easel serve` or `easel worker` on
    this data folder when one runs, else a worker of this process (started in the background, so that
    the body, a prompt say, need not wait for torch to load)."""
    own: list[Any] = []  # the worker this process started, once it has
    if await asyncio.to_thread(a_worker_is_running, core.settings):
        print("a worker is already running on this data folder (easel serve or easel worker): "
              "it runs the jobs", file=out, flush=True)
    task = asyncio.create_task(_serve_when_nobody_does(core, own, debug, out), name="easel-local-worker")
    body = asyncio.current_task()

    def stop_the_body_if_the_worker_failed(task: asyncio.Task[None]) -> None:
        if body is not None and _failure(task) is not None:
            body.cancel()  # else it would wait for its job forever

    task.add_done_callback(stop_the_body_if_the_worker_failed)
    try:
        yield
    except asyncio.CancelledError:
        if (error := _failure(task)) is not None:
            raise error from None
        raise
    finally:
        if own:
            own[0].stop()  # finishes the batch in hand (a cancelled one stops at its next step)
        else:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if (error := _failure(task)) is not None:
        raise error


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    return task.exception() if task.done() and not task.cancelled() else None


async def _serve_when_nobody_does(core: Core, own: list[Any], debug: bool, out: TextIO) -> None:
    announced = False
    while await asyncio.to_thread(a_worker_is_running, core.settings):
        announced = True
        await asyncio.sleep(RECHECK_S)
    if announced:
        print("the other worker stopped; starting one here", file=out, flush=True)
    worker_module = await import_generation(debug)
    worker = worker_module.build_worker(core)
    own.append(worker)
    await worker.run()


async def import_generation(debug: bool = False) -> ModuleType:
    """`generation.worker` (torch and diffusers: seconds), imported on a thread of its own so that the
    event loop keeps answering meanwhile: a prompt shows, Ctrl+C is heard. A daemon thread: a command
    that ends meanwhile does not wait for the import to finish."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[ModuleType] = loop.create_future()

    def load() -> None:
        try:
            with garbage_collection_paused():
                module = importlib.import_module("generation.worker")
            if not debug:
                quiet_generation_libraries()
        except BaseException as error:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, done, None, error)
        else:
            loop.call_soon_threadsafe(_settle, done, module, None)

    threading.Thread(target=load, name="easel-import-generation", daemon=True).start()
    return await done


@contextlib.contextmanager
def garbage_collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused meanwhile, and everything that exists afterwards frozen out
    of later collections (gc.freeze). Importing torch, transformers and diffusers makes millions of
    objects that live as long as the process; as they pile up they set off full collections again and
    again, which free nothing: a fifth of the generation stack's import time here, half of pytest's
    collection of the tests. Frozen, they are not walked again by each full collection while the worker
    runs either."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _settle(future: asyncio.Future[ModuleType], module: ModuleType | None, error: BaseException | None) -> None:
    if future.done():  # the awaiting command gave up waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(module)  # type: ignore[arg-type]


def quiet_generation_libraries() -> None:
    """diffusers' and transformers' loading bars and advice ("should be kept in float32: []") are for
    notebooks; the console shows its own progress. `--debug` keeps them."""
    import diffusers
    import huggingface_hub
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    if not sys.warnoptions:  # -W and PYTHONWARNINGS still win
        warnings.simplefilter("ignore")
