"""The `easel` command as a user runs it: separate processes sharing one data folder."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

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
    process = subprocess.Popen(
        [sys.executable, "-m", "adapters.cli", "imagine", "a slow one --size 192x192 --steps 40 --seed 9",
         "-o", str(tmp_path / "out")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    settings = load_settings(None, storage={"data_dir": tmp_path / "data"})

    async def running_job() -> str | None:
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
            job_id = asyncio.run(running_job())
    assert job_id is not None, "the job never started running"
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
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = easel({**env, "EASEL_HTTP__PORT": str(port)}, "serve", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port} (Address already in use); set "
                                     "another port with http.port or EASEL_HTTP__PORT")


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
