"""A fleet across hosts, for real: PostgreSQL, an S3 server, `easel serve` and three `easel worker`
processes, each in a Linux network namespace of its own, joined by two bridges.

    sudo .venv/bin/python -m bench.fleet_live          # root: it makes namespaces, veths and bridges

    backend 10.17.1.0/24   db .2 (PostgreSQL)   s3 .3 (moto's S3 server)   serve .4   w1 .11  w2 .12  w3 .13
    frontend 10.17.2.0/24  serve .4 (the HTTP API, the only thing listening there)   this harness .1

The workers are on the backend only, where the database and the object store are; the HTTP API
listens on the frontend only, and no namespace forwards packets, so a worker reaches the database and
the store and nothing of the serving host. (This harness sits on both bridges to set up and check.)
Each worker also has a UTS namespace and hostname of its own, so the workers see each other as other
hosts: a dead one's jobs come back only when its lease runs out.

Twelve API keys (twelve users) submit 60 jobs through the HTTP API. While the workers run them, w1's
link is cut in the middle of a batch (`ip link set ... down`: it can reach nothing, as a host whose
network died) and w2 is SIGKILLed in the middle of another. Then it checks that all 60 jobs succeeded,
each exactly once (one set of images per job, each image's object in the bucket, no object that no
image row names), within the lease plus a batch time of the cut, and that the HTTP API serves the
images from the object store (the serving host has no image folder). Prints the timings.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/fleet_live.py`: import from the repository root, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import httpx

PREFIX = "e17"  # every namespace, veth and bridge this makes starts with it
BACKEND, FRONTEND = f"{PREFIX}back", f"{PREFIX}front"
HOSTS = {  # namespace -> [(bridge, address)]
    "db": [(BACKEND, "10.17.1.2")],
    "s3": [(BACKEND, "10.17.1.3")],
    "serve": [(BACKEND, "10.17.1.4"), (FRONTEND, "10.17.2.4")],
    "w1": [(BACKEND, "10.17.1.11")],
    "w2": [(BACKEND, "10.17.1.12")],
    "w3": [(BACKEND, "10.17.1.13")],
}
BUCKET, LEASE_S, USERS, JOBS_EACH = "easel-live", 6.0, 12, 5
DB_URL = "postgresql+asyncpg://easel@10.17.1.2:5432/postgres"
S3_URL = "http://10.17.1.3:5000"
API = "http://10.17.2.4:8080"
AWS = {"AWS_ACCESS_KEY_ID": "fleet", "AWS_SECRET_ACCESS_KEY": "fleet-secret", "AWS_REGION": "us-east-1"}


def sh(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip() or done.stdout.strip()}")


def in_ns(host: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", f"{PREFIX}-{host}", *command]


@contextlib.contextmanager
def network() -> Iterator[None]:
    """The two bridges, a namespace per host and a veth from each of its addresses to its bridge."""
    veths = [f"{PREFIX}{host}{bridge[len(PREFIX)]}" for host, links in HOSTS.items() for bridge, _ in links]

    def remove() -> None:
        # The veths explicitly: a namespace lives on while a socket of a killed process still refers to
        # it (a TCP connection cut off by the downed link, retrying), and its veths with it.
        for name in (*veths, BACKEND, FRONTEND):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        for host in HOSTS:
            subprocess.run(["ip", "netns", "del", f"{PREFIX}-{host}"], capture_output=True)

    remove()  # what an interrupted run left
    try:
        for bridge, address in ((BACKEND, "10.17.1.1/24"), (FRONTEND, "10.17.2.1/24")):
            sh("ip", "link", "add", bridge, "type", "bridge")
            sh("ip", "addr", "add", address, "dev", bridge)
            sh("ip", "link", "set", bridge, "up")
        for host, links in HOSTS.items():
            sh("ip", "netns", "add", f"{PREFIX}-{host}")
            sh(*in_ns(host, "ip", "link", "set", "lo", "up"))
            for bridge, address in links:
                outside, inside = f"{PREFIX}{host}{bridge[len(PREFIX)]}", f"eth{bridge[len(PREFIX)]}"
                sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside, "netns", f"{PREFIX}-{host}")
                sh("ip", "link", "set", outside, "master", bridge, "up")
                sh(*in_ns(host, "ip", "addr", "add", f"{address}/24", "dev", inside))
                sh(*in_ns(host, "ip", "link", "set", inside, "up"))
        yield
    finally:
        remove()


@contextlib.contextmanager
def postgres(base: Path) -> Iterator[None]:
    from tests.postgres import find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        sys.exit("PostgreSQL is not installed (no initdb): `make install` installs Debian's postgresql")
    data = base / "pgdata"
    data.mkdir(parents=True)
    shutil.chown(base, "postgres")
    shutil.chown(data, "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    sh(*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-U", "easel", "--auth=trust", "-E", "UTF8")
    with (data / "pg_hba.conf").open("a") as hba:
        hba.write("host all all 10.17.1.0/24 trust\n")
    options = f"-p 5432 -k {data} -c listen_addresses=10.17.1.2 -c fsync=off"
    sh(*in_ns("db", *as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
              str(data / "log"), "-w", "start"))
    try:
        yield
    finally:
        subprocess.run(in_ns("db", *as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                             "stop"), capture_output=True)


def easel_env(base: Path, host: str, models_dir: Path) -> dict[str, str]:
    return {**os.environ, **AWS, "AWS_ENDPOINT_URL": S3_URL, "EASEL_DATABASE__URL": DB_URL,
            "EASEL_STORAGE__IMAGES_URL": f"s3://{BUCKET}/live", "EASEL_STORAGE__DATA_DIR": str(base / host),
            "EASEL_STORAGE__MODELS_DIR": str(models_dir), "EASEL_GENERATION__DEFAULT_MODEL": "tiny",
            "EASEL_MODELS": '{"tiny": {"source": "builtin:tiny", "default_width": 64, "default_height": 64}}',
            "EASEL_QUEUE__LEASE_S": str(LEASE_S), "EASEL_QUEUE__WATCHDOG_S": "0",
            "EASEL_GENERATION__POLL_INTERVAL_MS": "200", "EASEL_GENERATION__PROGRESS_EVERY_S": "0",
            "EASEL_HTTP__ENABLED": "true",
            "EASEL_HTTP__HOST": "10.17.2.4", "EASEL_HTTP__PORT": "8080", "OMP_NUM_THREADS": "1"}


def start_easel(base: Path, host: str, models_dir: Path, *args: str) -> subprocess.Popen[str]:
    """`easel ARGS` on `host`, with a hostname of its own (its own UTS namespace)."""
    log = (base / f"{host}.log").open("w")
    command = in_ns(host, "unshare", "--uts", "sh", "-c", f"hostname {host} && exec \"$0\" \"$@\"",
                    sys.executable, "-m", "adapters.cli", *args)
    return subprocess.Popen(command, env=easel_env(base, host, models_dir), stdout=log, stderr=subprocess.STDOUT,
                            text=True)


async def wait_for(what: str, check, timeout_s: float = 120.0, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if found := await check():
                return found
        await asyncio.sleep(every_s)
    raise SystemExit(f"timed out waiting for {what}")


async def run(base: Path, models_dir: Path) -> None:
    import boto3
    from sqlalchemy import select

    from bot.bootstrap import open_core
    from bot.config import load_settings
    from bot.domain import JobStatus
    from bot.models import Image, Job

    s3 = boto3.client("s3", endpoint_url=S3_URL, **{k.lower(): v for k, v in AWS.items() if k != "AWS_REGION"},
                      region_name=AWS["AWS_REGION"])
    await wait_for("the S3 server", lambda: asyncio.to_thread(s3.list_buckets))
    s3.create_bucket(Bucket=BUCKET)
    os.environ.update({**AWS, "AWS_ENDPOINT_URL": S3_URL})
    core = await open_core(load_settings(None, database={"url": DB_URL}, storage={
        "data_dir": base / "harness", "images_url": f"s3://{BUCKET}/live", "models_dir": models_dir}))
    keys = [(await core.apikeys.create(f"user{index}"))[0] for index in range(USERS)]

    processes = {"serve": start_easel(base, "serve", models_dir, "serve", "--no-worker")}
    processes |= {host: start_easel(base, host, models_dir, "worker") for host in ("w1", "w2", "w3")}
    try:
        async with httpx.AsyncClient(base_url=API, timeout=30) as client:
            await wait_for("easel serve", lambda: client.get("/healthz"))
            await wait_for("three workers", lambda: _registered(core, 3))
            submitted = time.monotonic()
            for job in range(JOBS_EACH):
                for key in keys:
                    answer = await client.post("/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                                               json={"kind": "imagine", "prompt": f"a lighthouse number {job}",
                                                     "steps": 20, "size": "96x96"})
                    answer.raise_for_status()
            # Cut w1's link in the middle of a batch, then SIGKILL w2 in the middle of another.
            w1 = await wait_for("w1 mid-batch", lambda: _busy(core, "w1"))
            sh("ip", "link", "set", f"{PREFIX}w1b", "down")
            cut = time.monotonic()
            w2 = await wait_for("w2 mid-batch", lambda: _busy(core, "w2"))
            processes["w2"].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            print(f"cut w1's link while it ran {w1}; SIGKILLed w2 while it ran {w2}")

            async def succeeded(job_ids: list[str]) -> bool:
                jobs = [await core.service.get_job(job_id) for job_id in job_ids]
                return all(job.status is JobStatus.SUCCEEDED for job in jobs)

            # The stranded batches: back in the queue after the lease, then run by a live worker.
            await wait_for("w1's batch", lambda: succeeded(w1.split(",")), timeout_s=600, every_s=0.2)
            w1_back = time.monotonic() - cut
            await wait_for("w2's batch", lambda: succeeded(w2.split(",")), timeout_s=600, every_s=0.2)
            w2_back = time.monotonic() - killed

            async def all_done() -> bool:
                jobs = await core.service.list_jobs(limit=200)
                return len(jobs) == USERS * JOBS_EACH and all(j.status is JobStatus.SUCCEEDED for j in jobs)

            await wait_for("all 60 jobs", all_done, timeout_s=600, every_s=0.5)
            done = time.monotonic()
            jobs = await core.service.list_jobs(limit=200)
            image_rows = [image for job in jobs for image in job.images]
            served = await client.get(f"/v1/images/{image_rows[0].sha256}")
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()

    async with core.db.unit_of_work(write=False) as uow:
        attempts = dict((await uow.session.execute(select(Job.id, Job.attempts))).all())
        rows = (await uow.session.execute(select(Image.job_id, Image.index, Image.sha256))).all()
    objects = {item["Key"].rsplit("/", 1)[1].removesuffix(".png")
               for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="live/").get("Contents", [])}
    await core.close()
    per_job = {job.id: len(job.images) for job in jobs}
    batch_s = max((job.finished_at - job.started_at).total_seconds() for job in jobs)
    stored = s3.get_object(Bucket=BUCKET, Key=f"live/{image_rows[0].sha256[:2]}/{image_rows[0].sha256}.png")
    checks = {
        "60 jobs, all succeeded": len(jobs) == USERS * JOBS_EACH and all(j.status is JobStatus.SUCCEEDED for j in jobs),
        "one image per job (one set, none twice)": set(per_job.values()) == {1} and len(rows) == len(jobs),
        "every image row's object is in the bucket": {sha for _, _, sha in rows} <= objects,
        "no object that no image row names": objects <= {sha for _, _, sha in rows},
        "the HTTP API served an image from the bucket": served.status_code == 200
        and served.content == stored["Body"].read() and not (base / "serve" / "images").exists(),
        # A stranded job is back in the queue within lease_s * 1.25 (the lease, and the next worker's look
        # every lease_s/4); then it waits for a live worker's batch in hand and its own, the slowest
        # batch here taking a few seconds on this CPU.
        f"the cut worker's batch done {w1_back:.1f} s after the cut, the killed one's {w2_back:.1f} s after "
        f"the kill (lease {LEASE_S:g} s)": max(w1_back, w2_back) < LEASE_S * 1.25 + 2 * batch_s,
    }
    print(f"60 jobs from {USERS} users in {done - submitted:.1f} s; {done - cut:.1f} s from the cut to the last; "
          f"{sum(1 for a in attempts.values() if a > 1)} job(s) ran twice (taken back after a lease)")
    for check, passed in checks.items():
        print(f"  {'ok  ' if passed else 'FAIL'} {check}")
    if not all(checks.values()):
        raise SystemExit(1)


async def _registered(core, count: int) -> bool:
    return len(await core.workers.list()) >= count


async def _busy(core, host: str) -> str | None:
    """The job ids of `host`'s batch, once its running jobs have made a step."""
    for worker in await core.workers.list():
        if worker.host == host and worker.batch:
            jobs = [await core.service.get_job(job_id) for job_id in worker.batch]
            if all(job.progress_step >= 1 for job in jobs):
                return ",".join(worker.batch)
    return None


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench/fleet_live.py makes network namespaces: run it as root")
    from generation.builtin import ensure_builtin

    base = Path(tempfile.mkdtemp(prefix="easel-live-"))
    base.chmod(0o755)  # the postgres user reaches its data folder below it
    models_dir = base / "models"
    ensure_builtin("tiny", models_dir)  # built once here, not three times at once by the workers
    with network(), postgres(base / "pg"):
        s3 = subprocess.Popen(in_ns("s3", sys.executable, "-m", "moto.server", "-H", "10.17.1.3", "-p", "5000"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(run(base, models_dir))
        finally:
            s3.kill()
            s3.wait()
    print(f"logs in {base}")


if __name__ == "__main__":
    main()
