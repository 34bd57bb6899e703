"""Images in an S3-compatible object store (storage.images_url = "s3://BUCKET/PREFIX"), against a real
S3 server on 127.0.0.1 (moto's server mode): generated through the real path, read back through the
HTTP image route, streamed or redirected to a presigned URL; an /animate clip's frames and MP4 kept in
the bucket, served from it, and resumed from it."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bot.bootstrap import Core, open_core
from bot.config import ModelConfig, Settings, load_settings
from bot.domain import JobStatus, TeachCommand
from bot.errors import ConfigError, NotFound
from bot.queue import JobQueue
from bot.store import ImageStore, S3ImageStore
from bot.teach import COMPARISON_SEED
from bot.views import ImageView
from generation.pipelines import DiffusersGenerator
from generation.shapes import COLOURS, Description, describe
from generation.worker import Worker, build_worker
from tests.conftest import alice, png_bytes
from tests.http_fixtures import running_worker, serving, wait_done
from tests.s3_server import S3Server, s3_server, use_s3_environment
from tests.test_animate import decoded, share
from tests.test_teach import WORD, teaching_pictures

BUCKET = "easel-images"
SHAPES = '{"shapes": {"source": "builtin:shapes", "default_width": 64, "default_height": 64}}'


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def shapes(models_dir: Path) -> DiffusersGenerator:
    model = ModelConfig(source="builtin:shapes", default_width=64, default_height=64)
    return DiffusersGenerator({"shapes": model}, device="cpu", dtype="float32", cache_dir=models_dir)


def s3_settings(tmp_path: Path, models_dir: Path, prefix: str, **storage: object) -> Settings:
    return load_settings(None, storage={"data_dir": tmp_path / "data", "models_dir": models_dir,
                                        "images_url": f"s3://{BUCKET}/{prefix}", **storage},
                         generation={"poll_interval_ms": 50, "progress_every_s": 0},
                         http={"port": 0})


@pytest.fixture
async def s3_core(request: pytest.FixtureRequest, tmp_path: Path, models_dir: Path, s3: S3Server,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Core]:
    use_s3_environment(monkeypatch, s3)
    monkeypatch.setenv("EASEL_MODELS", SHAPES)  # the pictures are read back: the model that draws shapes
    monkeypatch.setenv("EASEL_GENERATION__DEFAULT_MODEL", "shapes")
    links = getattr(request, "param", "stream")
    core = await open_core(s3_settings(tmp_path, models_dir, prefix=request.node.name[:40], image_links=links))
    try:
        yield core
    finally:
        await core.close()


async def generate(client: httpx.AsyncClient, prompt: str, **fields: object) -> dict:
    response = await client.post("/v1/jobs", json={"kind": "imagine", "prompt": prompt, "seed": 1, **fields})
    assert response.status_code == 202, response.text
    job = await wait_done(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    return job


async def test_a_generated_image_lands_in_the_bucket_and_the_image_route_streams_it(
        s3_core: Core, s3: S3Server, shapes: DiffusersGenerator) -> None:
    async with serving(s3_core) as server, server.client(await server.new_key()) as client, \
            running_worker(s3_core, shapes):
        job = await generate(client, "a red circle on a blue background")
        image = job["images"][0]
        served = await httpx.AsyncClient().get(image["url"])  # the link, no key, as a chat shows it

    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert describe(Image.open(io.BytesIO(served.content))) == Description("red", "circle", "blue")
    sha = image["url"].rsplit("/", 1)[1]
    prefix = s3_core.settings.storage.images_url.removeprefix(f"s3://{BUCKET}/")
    assert s3.keys(BUCKET) and f"{prefix}/{sha[:2]}/{sha}.png" in s3.keys(BUCKET)
    stored = s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}/{sha[:2]}/{sha}.png")["Body"].read()
    assert stored == served.content
    assert not (s3_core.settings.storage.data_dir / "images").exists()  # nothing on this host's disk
    assert (await s3_core.service.get_job(job["id"])).images[0].path == f"s3://{BUCKET}/{prefix}/{sha[:2]}/{sha}.png"


@pytest.mark.parametrize("s3_core", ["redirect"], indirect=True)
async def test_with_redirect_links_the_route_answers_307_to_a_presigned_url_the_store_serves(
        s3_core: Core, s3: S3Server, shapes: DiffusersGenerator) -> None:
    async with serving(s3_core) as server, server.client(await server.new_key()) as client, \
            running_worker(s3_core, shapes):
        job = await generate(client, "a yellow square on a black background")
        link = job["images"][0]["url"]
        answer = await httpx.AsyncClient().get(link)
        followed = await httpx.AsyncClient(follow_redirects=True).get(link)

    assert answer.status_code == 307
    assert answer.headers["location"].startswith(f"{s3.endpoint}/{BUCKET}/")
    assert "X-Amz-Signature=" in answer.headers["location"]
    assert followed.status_code == 200 and str(followed.url).startswith(s3.endpoint)  # the store sent the bytes
    assert describe(Image.open(io.BytesIO(followed.content))) == Description("yellow", "square", "black")


async def test_an_uploaded_image_goes_to_the_bucket_and_the_worker_edits_it_from_there(
        s3_core: Core, s3: S3Server, shapes: DiffusersGenerator) -> None:
    async with serving(s3_core) as server, server.client(await server.new_key()) as client, \
            running_worker(s3_core, shapes):
        response = await client.post("/v1/jobs", data={"command": "/edit a green circle on a white background "
                                                                  "--strength 0.3 --steps 4 --seed 1"},
                                     files={"image": ("photo.png", png_bytes(64, 64, (255, 255, 255)), "image/png")})
        assert response.status_code == 202, response.text
        job = await wait_done(client, response.json()["id"])
        upload = await client.get(job["inputs"]["image"])

    assert job["status"] == "succeeded", job
    assert upload.status_code == 200 and Image.open(io.BytesIO(upload.content)).getpixel((5, 5)) == (255, 255, 255)
    upload_sha = job["inputs"]["image"].rsplit("/", 1)[1]
    assert any(key.endswith(f"/{upload_sha}.png") for key in s3.keys(BUCKET))
    assert not (s3_core.settings.storage.data_dir / "images").exists()


async def test_the_same_bytes_are_stored_once_and_a_missing_image_is_not_found(
        s3_core: Core, s3: S3Server) -> None:
    prefix = s3_core.settings.storage.images_url.removeprefix(f"s3://{BUCKET}/")
    first = s3_core.store.save_input(png_bytes(color=(1, 2, 3)))
    again = s3_core.store.save_input(png_bytes(color=(1, 2, 3)))  # a second worker with the same image
    assert first == again
    assert [key for key in s3.keys(BUCKET) if key.startswith(f"{prefix}/")] == \
        [f"{prefix}/{first.sha256[:2]}/{first.sha256}.png"]
    assert s3_core.store.read_bytes(first.sha256) == png_bytes(color=(1, 2, 3))
    missing = "0" * 64
    assert not await s3_core.store.exists(missing)
    with pytest.raises(NotFound, match="is not in the store"):
        s3_core.store.read_bytes(missing)
    async with serving(s3_core) as server:
        assert (await httpx.AsyncClient().get(f"{server.url}/v1/images/{missing}")).status_code == 404


def test_the_store_is_chosen_by_images_url_and_a_bad_url_names_the_fix(tmp_path: Path, models_dir: Path) -> None:
    store = S3ImageStore(f"s3://{BUCKET}/a/b", endpoint="http://127.0.0.1:1")
    assert store.location_of("ab" * 32) == f"s3://{BUCKET}/a/b/ab/{'ab' * 32}.png"
    for bad in ("/srv/images", "http://bucket/prefix", "s3:///prefix"):
        with pytest.raises(ConfigError, match=r"s3://BUCKET/PREFIX"):
            load_settings(None, storage={"data_dir": tmp_path, "images_url": bad})
    with pytest.raises(ConfigError, match=r"http:// or https://"):
        load_settings(None, storage={"data_dir": tmp_path, "images_url": "s3://b/p", "s3_endpoint": "minio:9000"})


# -- /animate: a clip's frames and MP4 in the bucket ---------------------------------------------------------


async def submit(client: httpx.AsyncClient, command: str) -> str:
    response = await client.post("/v1/jobs", json={"command": command})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def job_files(s3: S3Server, core: Core, job_id: str) -> dict[str, bytes]:
    """A job's files as they lie in the bucket, read behind Easel's back: name -> bytes."""
    folder = core.settings.storage.images_url.removeprefix(f"s3://{BUCKET}/") + f"/jobs/{job_id}/"
    return {key.removeprefix(folder): s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
            for key in s3.keys(BUCKET) if key.startswith(folder)}


@pytest.mark.parametrize("s3_core", ["stream", "redirect"], indirect=True)
async def test_an_animation_keeps_its_frames_and_clip_in_the_bucket_and_the_video_route_serves_it(
        s3_core: Core, s3: S3Server, shapes: DiffusersGenerator) -> None:
    async with serving(s3_core) as server, server.client(await server.new_key()) as client, \
            running_worker(s3_core, shapes):
        job_id = await submit(client, "/animate a red circle on a blue background --frames 6 --fps 4 "
                                      "--zoom 1.05 --steps 6 --seed 3")
        job = await wait_done(client, job_id)
        # The link, no key, as a chat or the web page's <video> opens it.
        served = await httpx.AsyncClient(follow_redirects=True).get(job["video"])
        gif = await httpx.AsyncClient(follow_redirects=True).get(job["gif"])

    assert job["status"] == "succeeded", job
    assert served.status_code == 200 and served.headers["content-type"] == "video/mp4"
    if s3_core.settings.storage.image_links == "redirect":  # the store sent the bytes, from a presigned URL
        assert str(served.url).startswith(s3.endpoint) and "X-Amz-Signature=" in str(served.url)
    frames = decoded(served.content)
    assert len(frames) == 6 and frames[0].shape == (64, 64, 3)
    assert share(frames[0], "red") + share(frames[0], "blue") > 0.85  # the prompt, drawn
    stored = job_files(s3, s3_core, job_id)
    assert sorted(stored) == ["clip.gif", "clip.mp4", *(f"frame-{i:04d}.png" for i in range(6))]
    assert stored["clip.mp4"] == served.content  # the API host served the worker's clip from the bucket
    assert gif.headers["content-type"] == "image/gif" and stored["clip.gif"] == gif.content  # and its GIF
    data_dir = s3_core.settings.storage.data_dir
    assert not [path for path in data_dir.rglob("*") if path.suffix in (".png", ".mp4", ".gif")]  # nothing on this disk


async def test_an_animation_with_frames_in_the_bucket_resumes_after_them(
        s3_core: Core, s3: S3Server, shapes: DiffusersGenerator) -> None:
    async with serving(s3_core) as server, server.client(await server.new_key()) as client:
        job_id = await submit(client, "/animate a red circle on a blue background --frames 6 --steps 6 --seed 3")
        # What a worker on another host left when it was killed: the first three frames, here all green,
        # a picture this prompt never draws, so a frame made again would show.
        prefix = s3_core.settings.storage.images_url.removeprefix(f"s3://{BUCKET}/")
        green = png_bytes(64, 64, COLOURS["green"])
        for index in range(3):
            s3.client().put_object(Bucket=BUCKET, Key=f"{prefix}/jobs/{job_id}/frame-{index:04d}.png",
                                   Body=green)
        async with running_worker(s3_core, shapes):
            job = await wait_done(client, job_id)
        clip = decoded((await client.get(job["video"])).content)

    assert job["status"] == "succeeded", job
    stored = job_files(s3, s3_core, job_id)
    assert [stored[f"frame-{i:04d}.png"] for i in range(3)] == [green] * 3  # not made again
    assert len(clip) == 6
    assert all(share(frame, "green") > 0.9 for frame in clip[:3])  # the kept frames open the clip
    assert share(clip[3], "green") > 0.5  # the first new frame redraws the last kept one, not the prompt anew


# -- /teach across hosts: checkpoints and trained LoRAs go through the bucket ------------------------------


@dataclass
class Host:
    """One GPU host of a fleet: its own data folder (lora_dir, model cache), the fleet's database and bucket."""

    queue: JobQueue
    store: ImageStore
    settings: Settings


def host(core: Core, data_dir: Path) -> Host:
    """A host whose trainings run in slices of 5 steps with no samples."""
    storage = core.settings.storage.model_copy(update={"data_dir": data_dir})
    teach = core.settings.teach.model_copy(update={"slice_steps": 5, "samples": 0})
    return Host(core.queue, core.store, core.settings.model_copy(update={"storage": storage, "teach": teach}))


async def run_one_claim(worker: Worker, *, train: bool) -> None:
    """What a worker's loop does for one claim, on its own: the slice or batch it claims, run."""
    batch = await worker.queue.claim_batch(worker.worker_id, 4, train=train)
    assert batch, "nothing to claim"
    await worker._run_batch(batch)


async def test_a_training_goes_on_on_another_host_and_its_word_draws_on_a_third(
        s3_core: Core, s3: S3Server, tmp_path: Path) -> None:
    """Host A runs the first slice of a /teach, host B the second from A's checkpoint in the bucket and
    saves the LoRA there; host C, which never saw the training, draws with the word exactly what B's
    closing comparison drew with it."""
    a, b, c = (build_worker(host(s3_core, tmp_path / name)) for name in ("host-a", "host-b", "host-c"))
    training = (await s3_core.teach.submit(alice(), TeachCommand(WORD, steps=10), teaching_pictures(4))).job

    await run_one_claim(a, train=True)
    assert "checkpoint.pt" in job_files(s3, s3_core, training.id)  # in the bucket...
    assert not list((tmp_path / "host-a").rglob("*.pt"))  # ...not on host A's disk
    await run_one_claim(b, train=True)  # from step 5: the last slice, so the training ends here
    trained = await s3_core.service.get_job(training.id)
    assert trained.status is JobStatus.SUCCEEDED, trained.error
    prefix = s3_core.settings.storage.images_url.removeprefix(f"s3://{BUCKET}/")
    in_bucket = s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}/loras/trained/u1/{WORD}.safetensors")

    caption = teaching_pictures(4)[0].caption  # the comparison's prompt, with the comparison's seed
    asked = await s3_core.service.submit(alice(), s3_core.parser.parse(f"/imagine {caption} --seed {COMPARISON_SEED}"))
    await run_one_claim(c, train=False)
    drawn = await s3_core.service.get_job(asked.job.id)

    assert drawn.status is JobStatus.SUCCEEDED, drawn.error
    assert (tmp_path / "host-c" / "loras" / "trained" / "u1" / f"{WORD}.safetensors").read_bytes() == \
        in_bucket["Body"].read()
    without, with_word = (pixels(s3_core.store, image) for image in trained.images)
    assert np.array_equal(pixels(s3_core.store, drawn.images[0]), with_word) and not np.array_equal(with_word, without)
    assert not job_files(s3, s3_core, training.id).get("checkpoint.pt")  # a finished training keeps none


def pixels(store: ImageStore, image: ImageView) -> np.ndarray:
    with store.open_image(image.sha256) as opened:
        return np.asarray(opened.convert("RGB"))
