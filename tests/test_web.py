"""The web chat in a real browser: Debian's headless Chromium driven by Playwright, against the app under
uvicorn on 127.0.0.1 with the real builtin:tiny worker. Screenshots go to test-artifacts/."""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from bot.domain import JobKind
from generation.shapes import caption, training_combinations
from generation.worker import Worker
from tests import http_fixtures
from tests.conftest import png_bytes
from tests.http_fixtures import running_worker

settings, server = http_fixtures.settings, http_fixtures.server  # this module's fixtures

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, which `make install` installs (as root); the tests never install it."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make install` as root (it installs Debian's chromium), "
                    "or `apt-get install chromium`", pytrace=False)
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path, tmp_path: Path) -> AsyncIterator[BrowserContext]:
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(chromium), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1100, "height": 800})
        try:
            yield context
        finally:
            await context.close()


async def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / name), full_page=True)


async def open_chat(browser: BrowserContext, url: str) -> Page:
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(url)
    await expect(page.locator("#quota")).to_contain_text("units left today")  # a session key was issued
    # Record every value the progress bars show, to check the page showed progress on its way to done.
    await page.evaluate("""() => {
        window.progressSeen = [];
        new MutationObserver((records) => records.forEach((r) => {
            if (r.target.tagName === "PROGRESS") window.progressSeen.push([r.target.value, r.target.max]);
        })).observe(document.body, {subtree: true, attributes: true, attributeFilter: ["value"]});
    }""")
    return page


async def test_imagine_shows_the_queue_progress_and_the_image_then_re_roll_by_keyboard(
        server, generator, browser) -> None:
    page = await open_chat(browser, server.url)
    # Keyboard only: the command box has focus on load; Enter sends. A typo first: one line, then go on.
    await page.keyboard.type("/imagine a cat --sed 4")
    await page.keyboard.press("Enter")
    await expect(page.locator("#log .error")).to_have_text(
        "unknown flag --sed (did you mean --seed?); the flags are --no, --seed, --steps, --cfg, --ar, --size, "
        "--n, --sampler, --model, --strength, --style, --lora")
    await page.keyboard.type("/imagine a lighthouse at dusk --steps 8 --seed 3")
    await page.keyboard.press("Enter")
    first = page.locator("article.job").first
    await expect(first.locator(".status")).to_have_text("queued, position 1")  # no worker yet
    await screenshot(page, "web-queued.png")
    async with running_worker(server.core, generator):
        await expect(first.locator("figcaption .seed")).to_have_text("seed 3", timeout=60_000)
        await expect(first.locator(".status")).to_have_text("done, seed 3")
        seen = await page.evaluate("window.progressSeen")
        assert any(0 < value < maximum for value, maximum in seen), seen  # progress showed part-way
        image = first.locator("figure img")
        # decode() waits for the picture to load: the card shows the seed before the browser has fetched it.
        assert await image.evaluate("async img => { await img.decode(); return img.naturalWidth; }") == 64
        await screenshot(page, "web-imagine.png")

        # Tab to the Re-roll button and press Enter: no mouse needed.
        for _ in range(40):
            await page.keyboard.press("Tab")
            if await page.evaluate("document.activeElement.textContent") == "Re-roll":
                break
        else:
            pytest.fail("Re-roll cannot be reached with the Tab key")
        await page.keyboard.press("Enter")
        second = page.locator("article.job").nth(1)
        await expect(second.locator(".status")).to_contain_text("done, seed", timeout=60_000)
    jobs = await server.core.service.list_jobs()
    assert len(jobs) == 2 and jobs[0].params.prompt == jobs[1].params.prompt == "a lighthouse at dusk"
    assert jobs[0].params.seed != 3 and await second.locator(".seed").inner_text() == f"seed {jobs[0].params.seed}"
    await expect(page.locator("#history li")).to_have_count(2)
    await page.keyboard.press("Escape")
    await page.locator("#command").fill("/quota")
    await page.keyboard.press("Enter")
    await expect(page.locator("#log pre").last).to_contain_text("units left today")
    assert page.errors == []  # type: ignore[attr-defined]


async def test_inpaint_with_an_uploaded_picture_and_a_painted_mask_on_a_phone(
        server, generator, browser, tmp_path: Path) -> None:
    page = await open_chat(browser, server.url)
    await page.set_viewport_size(PHONE)
    picture = tmp_path / "garden.png"
    picture.write_bytes(png_bytes(256, 256, (40, 150, 60)))
    await page.locator("#file").set_input_files(str(picture))
    canvas = page.locator("#mask")
    await expect(canvas).to_be_visible()
    # Paint a vertical stroke down the left quarter of the picture.
    box = await canvas.bounding_box()
    await page.mouse.move(box["x"] + box["width"] * 0.15, box["y"] + 10)
    await page.mouse.down()
    await page.mouse.move(box["x"] + box["width"] * 0.15, box["y"] + box["height"] - 10, steps=12)
    await page.mouse.up()
    await expect(page.locator("#mask-state")).to_contain_text("Mask painted")
    await screenshot(page, "web-mask-phone.png")

    await page.locator("#command").fill("/inpaint a red door --steps 3 --seed 11")
    await page.locator("#send").click()
    async with running_worker(server.core, generator):
        await expect(page.locator("article.job figcaption .seed")).to_have_text("seed 11", timeout=60_000)
    await screenshot(page, "web-inpaint-phone.png")
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll

    [job] = await server.core.service.list_jobs()
    assert job.params.kind.value == "inpaint" and job.status.value == "succeeded"
    mask = Image.open(io.BytesIO(server.core.store.read_bytes(job.mask_image_sha))).convert("L")
    width, height = mask.size
    assert mask.getpixel((int(width * 0.15), height // 2)) == 255  # painted: repaint
    assert mask.getpixel((int(width * 0.8), height // 2)) == 0  # untouched: keep
    assert page.errors == []  # type: ignore[attr-defined]


async def test_a_withheld_image_is_a_notice_in_the_page_never_a_picture(
        server, generator, browser, flag_all_checker) -> None:
    page = await open_chat(browser, server.url)
    await page.locator("#command").fill("/imagine a statue --steps 2 --seed 9")
    await page.keyboard.press("Enter")
    # Queued before the burst worker looks, or it finds nothing to do and returns.
    await expect(page.locator("article.job .status")).to_have_text("queued, position 1")
    worker = Worker(server.core.queue, generator, server.core.store, server.core.settings,
                    worker_id="test-worker:1", image_checker=flag_all_checker)
    await worker.run(burst=True)
    card = page.locator("article.job").first
    await expect(card.locator(".withheld")).to_contain_text("Image 1 was withheld", timeout=60_000)
    await expect(card.locator(".status")).to_have_text("done, seed 9")
    await screenshot(page, "web-withheld.png")
    assert await card.locator("img").count() == 0  # not even blurred: the page was never given it
    [job] = await server.core.service.list_jobs()
    assert await page.evaluate(f"document.body.innerHTML.includes('{job.images[0].sha256}')") is False
    assert page.errors == []  # type: ignore[attr-defined]


async def test_the_page_has_an_icon_and_favicon_ico_is_it(server, browser) -> None:
    page = await open_chat(browser, server.url)
    response = await page.request.get(f"{server.url}/favicon.ico")
    assert response.status == 200 and response.headers["content-type"] == "image/svg+xml"
    icon = await page.locator("link[rel=icon]").get_attribute("href")
    assert icon == "/favicon.ico"
    # The browser draws it (the page's Content-Security-Policy allows it): a picture, not an error page.
    width = await page.evaluate("""async (href) => {
        const icon = new Image(); icon.src = href; await icon.decode(); return icon.naturalWidth; }""", icon)
    assert width > 0
    assert page.errors == []  # type: ignore[attr-defined]


@pytest.fixture
def shapes_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The users' default, builtin:shapes (conftest makes builtin:tiny the tests' only model)."""
    monkeypatch.setenv("EASEL_GENERATION__DEFAULT_MODEL", "shapes")
    monkeypatch.delenv("EASEL_MODELS")


async def test_the_page_suggests_prompts_the_default_model_draws(shapes_by_default, server, browser) -> None:
    page = await open_chat(browser, server.url)
    await expect(page.locator("#examples-model")).to_have_text("shapes")
    examples = page.locator("#examples button.example")
    await expect(examples).to_have_count(3)
    known = {caption(*combo) for combo in training_combinations()}  # what builtin:shapes learned to draw
    for prompt in await examples.all_inner_texts():
        assert prompt in known, prompt
    first_step = await page.locator("#first-step code").inner_text()
    assert re.fullmatch(r"/imagine (.+) --seed 42", first_step)[1] in known, first_step
    assert "lighthouse" not in await page.locator("#log").inner_text()
    await screenshot(page, "web-examples.png")

    await examples.nth(1).click()  # puts the command in the box, ready for flags or Enter
    command = page.locator("#command")
    await expect(command).to_be_focused()
    await expect(command).to_have_value(f"/imagine {await examples.nth(1).inner_text()} ")
    assert page.errors == []  # type: ignore[attr-defined]


async def test_an_attached_picture_leaves_the_results_in_view_on_a_desktop(
        server, generator, browser, tmp_path: Path) -> None:
    page = await open_chat(browser, server.url)  # 1100x800, the browser fixture's window
    await page.locator("#command").fill("/imagine a fox --steps 2 --seed 5 --n 4")
    await page.keyboard.press("Enter")
    async with running_worker(server.core, generator):
        await expect(page.locator("article.job figure img")).to_have_count(4, timeout=60_000)
    picture = tmp_path / "street.png"
    picture.write_bytes(png_bytes(512, 512, (90, 90, 160)))
    await page.locator("#file").set_input_files(str(picture))
    await expect(page.locator("#mask")).to_be_in_viewport()  # the painter comes into view to paint on
    await expect(page.locator("#command")).to_be_in_viewport()
    remove = page.locator("#remove-image")  # its tools are clear of the composer's row
    box = await remove.bounding_box()
    assert await remove.evaluate("(button, [x, y]) => document.elementFromPoint(x, y) === button",
                                 [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])
    await page.screenshot(path=str(ARTIFACTS / "web-attached-desktop.png"))  # the window, not the page

    # Scroll back up to the results, as a person does to pick one: the composer must not sit on them.
    await page.evaluate("window.scrollTo(0, 0)")
    image = page.locator("article.job figure img").first
    box, composer = await image.bounding_box(), await page.locator("#composer").bounding_box()
    centre = [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2]
    assert 0 < centre[1] < 800, box
    assert await image.evaluate("(img, [x, y]) => document.elementFromPoint(x, y) === img", centre)
    assert composer["y"] >= box["y"] + box["height"], (composer, box)
    await expect(page.locator("#command")).to_be_in_viewport()  # the command box still follows the reader
    await page.screenshot(path=str(ARTIFACTS / "web-attached-desktop-results.png"))  # the window, not the page
    assert page.errors == []  # type: ignore[attr-defined]


async def test_a_follow_up_card_says_which_button_made_it(server, generator, browser) -> None:
    page = await open_chat(browser, server.url)
    await page.locator("#command").fill("/imagine a fox --steps 2 --seed 5 --n 2")
    await page.keyboard.press("Enter")
    cards = page.locator("article.job")
    async with running_worker(server.core, generator):
        await expect(cards.first.locator(".status")).to_have_text("done, seeds 5, 6", timeout=60_000)
        [first] = await server.core.service.list_jobs()
        assert await cards.first.locator(".origin").count() == 0  # typed, not made by a button
        buttons = (f"Variations of image 2 of job {first.id}", f"Upscale of image 1 of job {first.id}",
                   f"Re-roll job {first.id} with a new seed")
        for count, name in enumerate(buttons, start=2):
            await page.get_by_role("button", name=name).click()
            await expect(cards).to_have_count(count)  # one at a time, so the cards come in this order
        for card in (cards.nth(1), cards.nth(2), cards.nth(3)):
            await expect(card.locator(".status")).to_contain_text("done, seed", timeout=60_000)
    await expect(cards.nth(1).locator(".origin")).to_have_text(f"Variations of image 2 of job {first.id}")
    await expect(cards.nth(2).locator(".origin")).to_have_text(f"Upscale of image 1 of job {first.id}")
    await expect(cards.nth(3).locator(".origin")).to_have_text(f"Re-roll of job {first.id}")
    await expect(page.locator("#history li").first).to_contain_text(f"Re-roll of job {first.id}: a fox")
    await screenshot(page, "web-follow-ups.png")
    kinds = {job.id: job.params.kind.value for job in await server.core.service.list_jobs()}
    for card, kind in zip((cards.nth(1), cards.nth(2), cards.nth(3)), ("edit", "edit", "imagine"), strict=True):
        job_id = (await card.get_attribute("aria-label")).removeprefix("Job ")
        assert kinds[job_id] == kind, (job_id, kinds)
    assert page.errors == []  # type: ignore[attr-defined]


async def test_zoom_out_and_pan_buttons_under_an_image_make_outpaint_jobs(server, generator, browser) -> None:
    page = await open_chat(browser, server.url)
    await page.locator("#command").fill("/imagine a fox --steps 2 --seed 5")
    await page.keyboard.press("Enter")
    cards = page.locator("article.job")
    async with running_worker(server.core, generator):
        await expect(cards.first.locator(".status")).to_have_text("done, seed 5", timeout=60_000)
        [first] = await server.core.service.list_jobs()
        for count, name in enumerate((f"Zoom out 2x of image 1 of job {first.id}",
                                      f"Pan left of image 1 of job {first.id}"), start=2):
            await page.get_by_role("button", name=name).click()
            await expect(cards).to_have_count(count)
        for card in (cards.nth(1), cards.nth(2)):
            await expect(card.locator(".status")).to_contain_text("done, seed", timeout=60_000)
    await expect(cards.nth(1).locator(".origin")).to_have_text(f"Zoom out 2x of image 1 of job {first.id}")
    await expect(cards.nth(2).locator(".origin")).to_have_text(f"Pan left of image 1 of job {first.id}")
    panned, zoomed, _ = await server.core.service.list_jobs()
    assert zoomed.params.kind is panned.params.kind is JobKind.OUTPAINT
    assert (zoomed.params.width, zoomed.params.height) == (128, 128)
    assert (panned.params.width, panned.params.height) == (96, 64)
    await expect(cards.nth(1).locator("figure img")).to_have_attribute("width", "128")
    assert page.errors == []  # type: ignore[attr-defined]


async def test_an_animation_plays_in_its_card(server, generator, browser) -> None:
    page = await open_chat(browser, server.url)
    await page.locator("#command").fill("/animate a fox --frames 3 --steps 4 --seed 5")
    await page.keyboard.press("Enter")
    card = page.locator("article.job").first
    async with running_worker(server.core, generator):
        await expect(card.locator(".status")).to_have_text("done, seed 5", timeout=60_000)
    [job] = await server.core.service.list_jobs()
    video = card.locator("video")
    await expect(video).to_have_attribute("src", re.compile(rf"/v1/videos/{job.images[0].sha256}$"))
    assert await video.evaluate("(v) => new Promise((done) => v.readyState >= 1 ? done(v.duration) : "
                                "v.addEventListener('loadedmetadata', () => done(v.duration)))") > 0
    assert page.errors == []  # type: ignore[attr-defined]
