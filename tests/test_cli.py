"""The `easel` command as a user runs it: separate processes sharing one data folder."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from adapters.local_worker import garbage_collection_paused
from bot.bootstrap import open_core
from bot.config import load_settings
from bot.domain import JobStatus


@pytest.fixture
def env(tmp_path: Path, models_dir: Path) -> dict[str, str]:
    return {**os.environ, "EASEL_STORAGE__DATA_DIR": str(tmp_path / "data"),
            "EASEL_STORAGE__MODELS_DIR": str(models_dir), "EASEL_GENERATION__PROGRESS_EVERY_S": "0",
            "EASEL_GENERATION__POLL_INTERVAL_MS": "50"}


def easel(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "adapters.cli", *args], env=env, capture_output=True,
                            text=True, timeout=240)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def easel_in_python(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Run the CLI's main() in a fresh interpreter; also whether torch was imported by the end."""
    code = ("import sys; from adapters.cli import main; status = main(sys.argv[1:]); "
            "print('torch imported:', 'torch' in sys.modules); sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                            timeout=240)
    return result, "torch imported: True" in result.stdout


def slow_imagine(env: dict[str, str], tmp_path: Path) -> subprocess.Popen[str]:
    """`easel imagine` with a job of 40 steps: seconds to interrupt it in."""
    return subprocess.Popen(
        [sys.executable, "-m", "adapters.cli", "imagine", "a slow one --size 192x192 --steps 40 --seed 9",
         "-o", str(tmp_path / "out")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def running_job(tmp_path: Path, process: subprocess.Popen[str]) -> str:
    """The id of the job an `easel imagine` process runs, once its first step is done."""
    settings = load_settings(None, storage={"data_dir": tmp_path / "data"})

    async def look() -> str | None:
        # Only read: the `easel imagine` process may still be creating the schema.
        core = await open_core(settings, migrate=False)
        try:
            jobs = await core.service.list_jobs()
        except OperationalError:  # no tables yet
            return None
        finally:
            await core.close()
        if jobs and jobs[0].status is JobStatus.RUNNING and jobs[0].progress_step >= 1:
            return jobs[0].id
        return None

    job_id = None
    deadline = time.monotonic() + 120
    while job_id is None and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        if (tmp_path / "data" / "easel.db").exists():
            job_id = asyncio.run(look())
    assert job_id is not None, "the job never started running"
    return job_id


def job_row(tmp_path: Path, job_id: str) -> tuple[str, str | None]:
    """(status, worker) straight from the database."""
    with sqlite3.connect(tmp_path / "data" / "easel.db") as db:
        return db.execute("SELECT status, worker FROM jobs WHERE id = ?", (job_id,)).fetchone()


def test_imagine_twice_with_a_seed_writes_byte_identical_files(env: dict[str, str], tmp_path: Path) -> None:
    outputs = []
    for run in ("first", "second"):
        run_env = {**env, "EASEL_STORAGE__DATA_DIR": str(tmp_path / run)}
        result = easel(run_env, "imagine", "a lighthouse at dusk --no fog --seed 42 --steps 6 --n 2",
                       "-o", str(tmp_path / run / "out"))
        files = sorted((tmp_path / run / "out").glob("*.png"))
        assert len(files) == 2
        assert "seeds 42, 43" in result.stdout
        assert all(str(f) in result.stdout for f in files)
        # The model loads here; the libraries' loading bars and advice stay out of the output.
        assert "Loading" not in result.stdout + result.stderr and "float32" not in result.stdout + result.stderr
        outputs.append([f.read_bytes() for f in files])
    assert outputs[0] == outputs[1]


def test_jobs_and_job_show_what_happened(env: dict[str, str], tmp_path: Path) -> None:
    easel(env, "imagine", "a quiet harbour --seed 5 --steps 3", "-o", str(tmp_path / "out"))
    listing = easel(env, "jobs").stdout
    assert "succeeded" in listing and "a quiet harbour" in listing
    job_id = listing.splitlines()[1].split()[0]
    detail = easel(env, "job", job_id).stdout
    for expected in (f"Job {job_id}: succeeded", "seeds 5", "steps 3", "model     tiny", "seed 5", "generated in"):
        assert expected in detail


def test_errors_are_one_line_a_user_can_act_on(env: dict[str, str], tmp_path: Path) -> None:
    result = easel(env, "imagine", "a cat --steps 500", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --steps must be a whole number from 1 to 50 (got 500)"
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    result = easel(env, "edit", str(text_file), "winter", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not a PNG" in result.stderr
    result = easel(env, "job", "zzzzzzzz", check=False)
    assert result.returncode == 2 and "No job with id 'zzzzzzzz'" in result.stderr


def test_config_check_names_every_bad_key(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "easel.toml"
    config.write_text('[limits]\nmax_steps = "lots"\nmax_stpes = 3\n[queue]\nmax_attempts = 0\n')
    result = easel(env, "config", "check", str(config), check=False)
    assert result.returncode == 2
    for key in ("limits.max_steps", "limits.max_stpes: unknown key", "queue.max_attempts"):
        assert key in result.stderr
    assert easel(env, "config", "check", "config.example.toml").returncode == 0


def test_a_worker_killed_mid_job_loses_nothing(env: dict[str, str], tmp_path: Path) -> None:
    """SIGKILL during generation; the next `easel worker --burst` finishes the job."""
    process = slow_imagine(env, tmp_path)
    job_id = running_job(tmp_path, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    result = easel(env, "worker", "--burst")
    assert "1 job(s) done" in result.stdout
    detail = easel(env, "job", job_id).stdout
    assert f"Job {job_id}: succeeded" in detail and "attempts  2" in detail and "seed 9" in detail


def test_config_check_says_loudly_when_a_real_model_runs_without_the_image_check(
        env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "real.toml"
    config.write_text('[models.sd15]\nsource = "runwayml/stable-diffusion-v1-5"\n')
    warned = easel(env, "config", "check", str(config))
    assert "WARNING: the image check is off" in warned.stderr and "sd15" in warned.stderr
    builtin_only = easel(env, "config", "check")
    assert "WARNING" not in builtin_only.stderr


def test_serve_on_a_taken_port_says_so_in_one_line(env: dict[str, str]) -> None:
    """... before loading torch: the user reads it at once, not after the generation stack's seconds."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result, torch_imported = easel_in_python({**env, "EASEL_HTTP__PORT": str(port)}, "serve")
    assert result.returncode == 2 and not torch_imported
    assert result.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port} (Address already in use); set "
                                     "another port with http.port or EASEL_HTTP__PORT")


def test_a_bad_output_folder_is_refused_before_anything_is_queued(env: dict[str, str], tmp_path: Path) -> None:
    a_file = tmp_path / "taken.png"
    a_file.write_bytes(b"")
    for out, message in ((a_file, f"error: -o {a_file} is a file, not a folder; name a folder for the images"),
                         (Path("/proc/x"), "error: -o /proc/x: cannot make that folder (No such file or directory)"
                                           "; name a folder you can write in")):
        result, torch_imported = easel_in_python(env, "imagine", "a cat --steps 2", "-o", str(out))
        assert result.returncode == 2 and result.stderr.strip() == message and not torch_imported
    assert "no jobs yet" in easel(env, "jobs").stdout


def test_a_closed_pipe_ends_the_listing_quietly(env: dict[str, str]) -> None:
    """`easel jobs | head -3`: the reader has gone before the first line is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "adapters.cli", "jobs"], env=env, stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.stderr == "" and result.returncode == 141


def test_ctrl_c_cancels_the_job_refunds_it_and_exits(env: dict[str, str], tmp_path: Path) -> None:
    process = slow_imagine(env, tmp_path)
    job_id = running_job(tmp_path, process)
    process.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stdout + stderr
    assert time.monotonic() - interrupted < 20  # the worker stops at the next step, not after 40
    assert f"Ctrl+C: cancelling job {job_id} (its quota is refunded; a running job stops at its next step)" \
        in stderr
    assert f"Job {job_id} was cancelled." in stdout
    assert job_row(tmp_path, job_id)[0] == "cancelled"  # and a cancelled job's charge counts no more
    assert not list((tmp_path / "out").glob("*.png"))


def test_a_bad_file_is_refused_before_torch_is_loaded(env: dict[str, str], tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    for path, message in (("missing.png", "error: the image file 'missing.png' does not exist"),
                          (str(text_file), "error: the image is not a PNG, JPEG, WebP, GIF or BMP file")):
        result, torch_imported = easel_in_python(env, "edit", path, "a cat")
        assert result.returncode == 2 and result.stderr.startswith(message) and not torch_imported


def test_the_collector_pauses_for_the_generation_stack_import_and_collects_again_after_it() -> None:
    """The pause makes the import cheaper; a collector left off would let every reference cycle the
    worker makes afterwards pile up for as long as it runs, even when the import failed."""

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    for failing in (False, True):
        try:
            with garbage_collection_paused():
                assert not gc.isenabled()
                if failing:
                    raise ImportError("no module named 'torch'")
        except ImportError:
            assert failing
        assert gc.isenabled() and gc.get_freeze_count() > 0  # what the import made is frozen
        Cycle()
        assert gc.collect() > 0  # made afterwards: collected


def test_imagine_leaves_its_job_to_the_running_worker(env: dict[str, str], tmp_path: Path) -> None:
    worker = subprocess.Popen([sys.executable, "-m", "adapters.cli", "worker"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().startswith("Easel worker: database")
        result, torch_imported = easel_in_python(env, "imagine", "a cat --steps 2 --seed 3", "-o",
                                                 str(tmp_path / "out"))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "a worker is already running on this data folder" in result.stderr
        assert not torch_imported and len(list((tmp_path / "out").glob("*.png"))) == 1
        job_id = result.stdout.split()[1]
        assert job_row(tmp_path, job_id) == ("succeeded", f"{socket.gethostname()}:{worker.pid}")
    finally:
        worker.send_signal(signal.SIGINT)
        worker.communicate(timeout=60)


@pytest.mark.parametrize("command", ["chat", "console"])
def test_the_console_prompts_at_once_and_answers_while_torch_loads(env: dict[str, str], tmp_path: Path,
                                                                   command: str) -> None:
    """A torch that never finishes importing: the chat still prompts, answers and ends. `easel console`
    is the same chat (the README calls it the console chat)."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("import time\ntime.sleep(3600)\n")
    chat = subprocess.Popen([sys.executable, "-m", "adapters.cli", command], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "PYTHONPATH": str(stub.parent)})
    assert chat.stdout is not None and chat.stdin is not None
    welcome = chat.stdout.readline()
    assert welcome.startswith("Easel console chat.") and chat.stdout.read(2) == "> "
    stdout, stderr = chat.communicate("/help\n/jobs\n/quota /imagine a cat --size 512x512 --n 4 --steps 30\n",
                                      timeout=60)
    assert chat.returncode == 0, stdout + stderr
    assert "/edit <image file> <prompt> [flags]" in stdout and "You have no jobs yet" in stdout
    assert "Quota (owner tier): no daily limit on units" in stdout and "costs 6 units" in stdout
