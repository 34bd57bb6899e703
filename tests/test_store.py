"""The image store: content-addressed, atomic, and carrying A1111-style parameters."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.domain import SAMPLERS, GenerationParams, JobKind
from bot.errors import NotFound
from bot.images import to_png_bytes
from bot.store import A1111_SAMPLER_NAMES, FolderImageStore, a1111_parameters, read_parameters


def picture(seed: int = 1) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def store(tmp_path: Path) -> FolderImageStore:
    return FolderImageStore(tmp_path / "images")


# The parameters text


def test_parameters_match_automatic1111_exactly() -> None:
    params = GenerationParams(JobKind.IMAGINE, "a lighthouse at dusk, oil painting", negative="blurry, text",
                              sampler="euler_a", seed=40, n=3)
    assert a1111_parameters(params, seed=42) == (
        "a lighthouse at dusk, oil painting\n"
        "Negative prompt: blurry, text\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 42, Size: 512x512, Model: tiny"
    )


def test_no_negative_prompt_means_no_negative_line() -> None:
    params = GenerationParams(JobKind.IMAGINE, "a cat", steps=30, cfg=5.5, width=768, height=512,
                              sampler="dpmpp_2m_karras", model="sd15")
    assert a1111_parameters(params, seed=7) == (
        "a cat\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 5.5, Seed: 7, Size: 768x512, Model: sd15")


@pytest.mark.parametrize("kind", [JobKind.EDIT, JobKind.INPAINT])
def test_edits_add_the_denoising_strength(kind: JobKind) -> None:
    params = GenerationParams(kind, "a cat", strength=0.6)
    assert a1111_parameters(params, seed=1).endswith(", Model: tiny, Denoising strength: 0.6")


def test_every_sampler_has_an_a1111_name() -> None:
    assert set(A1111_SAMPLER_NAMES) == set(SAMPLERS)
    assert A1111_SAMPLER_NAMES["pndm"] == "PLMS"


def test_a_model_name_with_a_comma_is_quoted_like_a1111() -> None:
    params = GenerationParams(JobKind.IMAGINE, "x", model="anime, v2")
    assert a1111_parameters(params, seed=1).endswith('Model: "anime, v2"')


# Saving and reading back


def test_parameters_chunk_round_trips(store: FolderImageStore) -> None:
    params = GenerationParams(JobKind.EDIT, "a red fox\nin snow", negative="low quality", strength=0.6,
                              seed=9)
    stored = store.save_generated(picture(), params, seed=10)
    expected = a1111_parameters(params, seed=10)
    assert read_parameters(stored.path) == expected
    assert read_parameters(str(stored.path)) == expected
    assert read_parameters(store.read_bytes(stored.sha256)) == expected


def test_an_image_without_the_chunk_reads_none(store: FolderImageStore) -> None:
    stored = store.save_input(to_png_bytes(picture()))
    assert read_parameters(stored.path) is None


def test_layout_and_metadata(store: FolderImageStore) -> None:
    stored = store.save_generated(picture(), GenerationParams(JobKind.IMAGINE, "a cat"), seed=1)
    assert stored.path == store.root / stored.sha256[:2] / f"{stored.sha256}.png"
    assert stored.path == store.path_of(stored.sha256)
    assert (stored.width, stored.height) == (64, 48)
    assert stored.size_bytes == stored.path.stat().st_size
    with Image.open(stored.path) as image:
        assert image.tobytes() == picture().tobytes()


def test_same_pixels_and_parameters_give_the_same_file(tmp_path: Path) -> None:
    params = GenerationParams(JobKind.IMAGINE, "a cat", seed=3)
    first = FolderImageStore(tmp_path / "a").save_generated(picture(), params, seed=3)
    second = FolderImageStore(tmp_path / "b").save_generated(picture(), params, seed=3)
    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()


def test_another_seed_gives_another_file(store: FolderImageStore) -> None:
    params = GenerationParams(JobKind.IMAGINE, "a cat", seed=3)
    first, second = store.save_generated(picture(), params, 3), store.save_generated(picture(), params, 4)
    assert first.sha256 != second.sha256


def test_saving_twice_is_a_no_op(store: FolderImageStore) -> None:
    png = to_png_bytes(picture())
    first = store.save_input(png)
    modified = first.path.stat().st_mtime_ns
    second = store.save_input(png)
    assert second == first
    assert first.path.stat().st_mtime_ns == modified
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == [first.path.name]


def test_writes_leave_no_temporary_files(store: FolderImageStore) -> None:
    for seed in range(3):
        store.save_input(to_png_bytes(picture(seed)))
    files = [p for p in store.root.rglob("*") if p.is_file()]
    assert len(files) == 3
    assert all(p.suffix == ".png" and not p.name.startswith(".") for p in files)


def test_a_failed_write_leaves_neither_the_image_nor_a_temporary_file(
    store: FolderImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def killed(*args: object) -> None:
        raise KeyboardInterrupt  # the process is stopped between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    png = to_png_bytes(picture())
    with pytest.raises(KeyboardInterrupt):
        store.save_input(png)
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


def test_save_input_wants_png(store: FolderImageStore) -> None:
    with pytest.raises(ValueError, match="PNG bytes"):
        store.save_input(b"\xff\xd8\xff\xe0 a jpeg")


# Looking images up


def test_a_missing_image_is_not_found(store: FolderImageStore) -> None:
    with pytest.raises(NotFound, match="is not in the store"):
        store.read_bytes("0" * 64)


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "abc", "A" * 64, "g" * 64])
def test_a_malformed_id_is_not_found(store: FolderImageStore, bad_id: str) -> None:
    with pytest.raises(NotFound, match="is not an image id"):
        store.read_bytes(bad_id)


# A job's named files (an /animate clip's frames and MP4)


def test_a_jobs_files_are_listed_by_name_and_a_rewrite_replaces_one_whole(store: FolderImageStore,
                                                                           tmp_path: Path) -> None:
    assert store.job_file_names("job1") == []  # a job that never kept a file
    store.put_job_file("job1", "frame-0001.png", b"second")
    store.put_job_file("job1", "frame-0000.png", b"first")
    store.put_job_file("job1", "frame-0000.png", b"first, again")  # a worker taken back and rerun
    assert store.job_file_names("job1") == ["frame-0000.png", "frame-0001.png"]
    assert store.read_job_file("job1", "frame-0000.png") == b"first, again"
    folder = tmp_path / "images" / "jobs" / "job1"
    assert sorted(path.name for path in folder.iterdir()) == ["frame-0000.png", "frame-0001.png"]  # no temporaries
    assert store.job_file_names("job2") == []  # one job's files are its own
    with pytest.raises(NotFound, match=r"file clip\.mp4 of job job1 is not in the store"):
        store.read_job_file("job1", "clip.mp4")


@pytest.mark.parametrize(("job_id", "name"), [("..", "x"), ("job1", "../../outside.png"), ("job1/..", "x"),
                                              ("job1", ".hidden")])
def test_a_job_file_name_that_could_leave_its_folder_is_refused(store: FolderImageStore, job_id: str,
                                                                 name: str) -> None:
    with pytest.raises(NotFound, match="letters, digits"):
        store.put_job_file(job_id, name, b"data")
