"""`easel`: the command line. Every command builds the same core (bot/bootstrap.py) and, where it
generates, runs the same worker as `easel serve`.

Errors a user can fix print one line (`error: ...`) and exit with status 2, also when a task group
wrapped them; anything else is a bug: one line plus `--debug` for the traceback, status 1. Ctrl+C
exits with 130, and a closed pipe (`easel jobs | head -3`) quietly with 141, as for SIGPIPE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from adapters.base import Adapter
from adapters.console import ConsoleChat, describe_job, describe_workers, read_attachment, read_training_folder
from adapters.local_worker import announce_worker, import_generation, serving_the_queue
from bot.bootstrap import Core, open_core
from bot.config import load_settings, safety_warning
from bot.database import upgrade_database
from bot.domain import TEACH_KINDS, InputImages, JobKind, JobStatus, TeachCommand
from bot.errors import EaselError, InvalidCommand
from bot.views import JobView

log = logging.getLogger("easel")

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a program Ctrl+C ended
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141, as for `yes | head -1`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easel", description="Stable Diffusion for chats: Discord, Telegram, HTTP and this console.",
        epilog='example: easel imagine "a lighthouse at dusk --no fog --seed 42 --n 2" -o out/')
    parser.add_argument("--config", type=Path,
                        help="TOML config file (default: $EASEL_CONFIG, else ./easel.toml if present)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def generation_command(name: str, help_text: str, files: list[str]) -> None:
        sub = commands.add_parser(name, help=help_text)
        for file in files:
            sub.add_argument(file, help=f"path of the {file} file")
        sub.add_argument("text", help="the prompt with any flags, e.g. \"a castle --seed 5 --steps 30\"")
        sub.add_argument("-o", "--out", type=Path, default=Path("."), help="folder for the results (default: .)")

    generation_command("imagine", "generate images from a prompt", [])
    generation_command("edit", "redraw an image guided by a prompt (img2img)", ["image"])
    generation_command("inpaint", "repaint the white pixels of a mask", ["image", "mask"])
    generation_command("outpaint", "paint more around an image: \"PROMPT --zoom 2\" or \"--left 128\" (the "
                       "prompt may be left out for an Easel result)", ["image"])
    generation_command("animate", "an MP4 whose frames move and redraw the one before: \"PROMPT --frames 24 "
                       "--zoom 1.05\", or keyframes \"0: a forest | 12: a city\"", [])
    commands.choices["animate"].add_argument("--image", type=Path,
                                             help="a picture for the first frame (default: drawn from the prompt)")
    teach = commands.add_parser("teach", help="teach the model a new word from a folder of pictures (a LoRA or "
                                "an embedding)",
                                epilog="example: easel teach mascot pics/ --steps 300 (captions: pics/*.txt)")
    teach.add_argument("name", help="what to call it: <lora:NAME>, and the trigger word unless --trigger")
    teach.add_argument("folder", type=Path, help="the pictures, each with an optional .txt caption of the same name")
    teach.add_argument("--steps", type=int, help="training steps (default: teach.default_steps)")
    teach.add_argument("--rank", type=int, help="LoRA rank (default: teach.default_rank)")
    teach.add_argument("--trigger", help="the word that calls it in a prompt (default: the name)")
    teach.add_argument("--kind", default="lora", choices=TEACH_KINDS,
                       help="what to train: a LoRA (default), or an embedding (a new word for what the model draws)")
    teach.add_argument("--model", help="the model to train it for (default: the default model)")
    teach.add_argument("--caption", default="", help="the caption of pictures without a .txt of their own")
    teach.add_argument("-o", "--out", type=Path, default=Path("."),
                       help="folder for the sample and comparison PNGs (default: .)")
    # `console` as well: the README and /help call it the console chat.
    commands.add_parser("chat", aliases=["console"],
                        help="a console chat that takes the same commands as Discord or Telegram"
                        ).set_defaults(command="chat")
    jobs = commands.add_parser("jobs", help="list recent jobs")
    jobs.add_argument("--limit", type=int, default=20)
    job = commands.add_parser("job", help="show one job: parameters, seeds, status, timings, errors")
    job.add_argument("job_id")
    worker = commands.add_parser("worker", help="run the generation worker alone")
    worker.add_argument("--burst", action="store_true", help="drain the queue, then exit")
    worker.add_argument("--no-train", action="store_true",
                        help="never run /teach trainings (leave them to the other workers); generate only")
    serve = commands.add_parser("serve", help="run the worker and every configured chat adapter")
    serve.add_argument("--no-worker", action="store_true",
                       help="the adapters alone, for a host without a GPU; `easel worker` runs on the GPU hosts")
    commands.add_parser("workers", help="list the running workers of every host: device, models, state")
    db = commands.add_parser("db", help="database maintenance")
    db.add_subparsers(dest="db_command", required=True).add_parser("upgrade", help="apply migrations")
    discord_sync = commands.add_parser("discord", help="Discord bot maintenance").add_subparsers(
        dest="discord_command", required=True).add_parser(
        "sync", help="register the slash commands with Discord (globally, or in one server at once)")
    discord_sync.add_argument("--guild", type=int, help="a server id: its commands update at once")
    config = commands.add_parser("config", help="configuration")
    check = config.add_subparsers(dest="config_command", required=True).add_parser(
        "check", help="validate a config file and name every bad key")
    check.add_argument("file", type=Path, nargs="?")
    apikey = commands.add_parser("apikey", help="API keys for the HTTP API")
    create = apikey.add_subparsers(dest="apikey_command", required=True).add_parser(
        "create", help="make a key (printed once; only its hash is stored)")
    create.add_argument("--name", required=True, help="who or what uses the key, e.g. support-bot")
    create.add_argument("--quota", type=int, help="images per UTC day (default: queue.daily_images_per_user)")
    convert = commands.add_parser(
        "convert-checkpoint", help="rewrite a pickle checkpoint (.ckpt, .pt) as .safetensors, running none of its "
        "code (Easel loads only .safetensors)")
    convert.add_argument("path", type=Path, help="the .ckpt or .pt file")
    convert.add_argument("--out", type=Path, help="the .safetensors file to write (default: beside it)")
    mcp = commands.add_parser("mcp", help="an MCP server (stdio) with imagine, edit and inpaint tools")
    mcp.add_argument("--url", help="the Easel HTTP API (default: http.public_url, else http://host:port)")
    mcp.add_argument("--key", help="API key (default: the EASEL_API_KEY environment variable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        status = _dispatch(args)
        sys.stdout.flush()  # a reader that closed the pipe shows here, not as noise at exit
        return status
    except (Exception, KeyboardInterrupt, BaseExceptionGroup) as raised:
        return _report(raised, debug=args.debug)


def _report(raised: BaseException, *, debug: bool) -> int:
    """The one error hook: the error a user can act on, unwrapped from any task group, in one line;
    the exit status."""
    error = _cause(raised)
    if isinstance(error, EaselError):
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    if isinstance(error, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(error, BrokenPipeError):
        # The reader has what it wanted. Point stdout at /dev/null so the flush at exit is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    if debug:
        raise raised
    print(f"internal error: {type(error).__name__}: {error} (run with --debug for details)", file=sys.stderr)
    return 1


def _cause(error: BaseException) -> BaseException:
    """What a task group (or nested ones) wrapped: the first error a user can act on, else the first."""
    leaves = list(_leaves(error))
    for kind in (EaselError, KeyboardInterrupt, BrokenPipeError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        settings = load_settings(args.file or args.config)
        print(f"{args.file or args.config or 'configuration'} is valid: database {settings.database_url_safe}, "
              f"models {', '.join(sorted(settings.models))}")
        if (warning := safety_warning(settings)) is not None:
            print(warning, file=sys.stderr)
        return 0
    if args.command == "convert-checkpoint":
        from generation.checkpoints import convert_pickle_checkpoint  # torch loads only for this command

        out = convert_pickle_checkpoint(args.path, args.out)
        print(f"wrote {out}; the pickle file can go (Easel ignores it when the .safetensors file is beside it)")
        return 0
    settings = load_settings(args.config)
    if args.command == "db":
        upgrade_database(settings.database_url)
        print(f"database {settings.database_url_safe} is up to date")
        return 0
    if args.command == "mcp":
        from adapters.mcp_server import run_mcp  # the mcp SDK loads only for this command

        return run_mcp(settings, url=args.url, key=args.key)
    handler = COMMANDS[args.command]
    return asyncio.run(_with_core(settings, lambda core: handler(core, args)))


async def _with_core(settings: Any, body: Callable[[Core], Awaitable[int]]) -> int:
    core = await open_core(settings)
    try:
        return await body(core)
    finally:
        await core.close()


async def _generate(core: Core, args: argparse.Namespace) -> int:
    # 1. Check what needs no worker: the output folder, the command, the files. The job service checks
    #    the images, the prompt and the quota as it queues the job, still before torch is loaded.
    check_output_folder(args.out)
    kind = JobKind(args.command)
    command = core.parser.parse(f"/{kind.value} {args.text}")
    files = [getattr(args, name) for name in ("image", "mask") if getattr(args, name, None) is not None]
    inputs = InputImages(
        image=read_attachment(str(files[0]), "image") if files else None,
        mask=read_attachment(str(files[1]), "mask") if len(files) > 1 else None,
    )
    chat = ConsoleChat(core, sys.stdout, output_dir=args.out)
    # 2. Queue it (a permutation prompt: one job per combination).
    jobs = [each.job for each in (await chat.submit(command, inputs)).every]
    # 3. Follow them to the end, served by the worker of `easel serve` or `easel worker` when one runs,
    #    else by one of our own. Ctrl+C cancels them.
    async with cancelling_on_ctrl_c(chat, jobs) as interrupted, serving_the_queue(core, debug=args.debug):
        jobs = [await chat.follow(job) for job in jobs]
    if interrupted.is_set():
        return EXIT_INTERRUPTED
    return 0 if all(job.status is JobStatus.SUCCEEDED for job in jobs) else 1


def check_output_folder(folder: Path) -> None:
    """`-o`: a folder that exists, or can be made, and can be written in; checked before anything is
    queued, so a bad one costs no job and no quota."""
    if folder.exists() and not folder.is_dir():
        raise InvalidCommand(f"-o {folder} is a file, not a folder; name a folder for the images")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidCommand(f"-o {folder}: cannot make that folder ({error.strerror}); name a folder you "
                             "can write in") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidCommand(f"-o {folder}: cannot write in that folder (permission denied); name a folder "
                             "you can write in")


@contextlib.asynccontextmanager
async def cancelling_on_ctrl_c(chat: ConsoleChat, jobs: list[JobView]) -> AsyncIterator[asyncio.Event]:
    """First Ctrl+C: cancel the jobs (their quota is refunded) and let the body see them end; the event it
    yields is then set. Second: quit at once."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    cancelling: set[asyncio.Task[None]] = set()
    ids = ", ".join(job.id for job in jobs)

    async def cancel() -> None:
        for job in jobs:
            with contextlib.suppress(EaselError):  # it finished meanwhile: its result is shown as usual
                await chat.core.service.cancel(chat.requester, job.id)

    def first_ctrl_c() -> None:
        print(f"\nCtrl+C: cancelling job {ids} (its quota is refunded; a running job stops at its next "
              "step). Ctrl+C again to quit at once.", file=sys.stderr, flush=True)
        interrupted.set()
        loop.add_signal_handler(signal.SIGINT, second_ctrl_c)
        task = loop.create_task(cancel(), name=f"easel-cancel-{jobs[0].id}")
        cancelling.add(task)

    def second_ctrl_c() -> None:
        print("interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)  # the torch thread may be inside a step: nothing else stops it now

    loop.add_signal_handler(signal.SIGINT, first_ctrl_c)
    try:
        yield interrupted
        await asyncio.gather(*cancelling)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _chat(core: Core, args: argparse.Namespace) -> int:
    chat = ConsoleChat(core, sys.stdout)
    chat.say("Easel console chat. Type /help for commands, /quit or Ctrl+D to leave.")
    async with serving_the_queue(core, debug=args.debug):  # loads in the background: the prompt shows now
        while True:
            try:
                line = await asyncio.to_thread(input, "> ")
            except EOFError:
                break
            if line.strip() in ("/quit", "/exit"):
                break
            if line.strip():
                await chat.handle(line)
    return 0


async def _jobs(core: Core, args: argparse.Namespace) -> int:
    jobs = await core.service.list_jobs(limit=args.limit)
    if not jobs:
        print("no jobs yet; try: easel imagine \"a red circle\"")
        return 0
    print(f"{'id':<9} {'status':<10} {'kind':<8} {'images':>6}  {'created (UTC)':<19}  {'owner':<14} prompt")
    for job in jobs:
        owner = f"{job.display_name or job.user_id}"[:14]
        print(f"{job.id:<9} {job.status.value:<10} {job.params.kind.value:<8} {job.params.n:>6}  "
              f"{job.created_at:%Y-%m-%d %H:%M:%S}  {owner:<14} {job.params.prompt[:60]}")
    return 0


async def _job(core: Core, args: argparse.Namespace) -> int:
    print(describe_job(core.deliveries.of_job(await core.service.get_job(args.job_id))))
    return 0


async def _apikey(core: Core, args: argparse.Namespace) -> int:
    token, key = await core.apikeys.create(args.name, daily_images=args.quota)
    quota = f"{args.quota} images a day" if args.quota is not None else "the default daily quota"
    print(f"API key {key.public_id} ({key.name}, {quota}). Send it as `Authorization: Bearer <key>`; "
          "it is shown only this once:", file=sys.stderr)
    print(token)
    return 0


async def _teach(core: Core, args: argparse.Namespace) -> int:
    """`easel teach NAME DIR`: the console's /teach, with the folder's pictures as its attachments."""
    check_output_folder(args.out)
    command = TeachCommand(name=args.name, kind=args.kind, steps=args.steps, rank=args.rank, trigger=args.trigger,
                           model=args.model, caption=args.caption)
    pictures = read_training_folder(args.folder)
    chat = ConsoleChat(core, sys.stdout, output_dir=args.out)
    async with serving_the_queue(core, debug=args.debug):
        job = await chat.teach(command, pictures)
    return 0 if job.status is JobStatus.SUCCEEDED else 1


async def _worker(core: Core, args: argparse.Namespace) -> int:
    worker = (await import_generation(args.debug)).build_worker(core, train=not args.no_train)
    _stop_on_signals(worker.stop)
    with announce_worker(core.settings):  # `easel imagine` on this data folder leaves its jobs to us
        if not args.burst:
            print(f"Easel worker: database {core.settings.database_url_safe}; Ctrl+C to stop", flush=True)
        stats = await worker.run(burst=args.burst)
    print(f"worker stopped: {stats.succeeded} job(s) done, {stats.failed} failed, "
          f"{stats.cancelled} cancelled, {stats.images} image(s)")
    return 0


async def _workers(core: Core, args: argparse.Namespace) -> int:
    print(describe_workers(await core.workers.list(), core.clock(), core.settings.queue.lease_s))
    return 0


async def _serve(core: Core, args: argparse.Namespace) -> int:
    adapters = configured_adapters(core)
    for adapter in adapters:  # the HTTP port: a taken one is refused before torch loads
        if (listen := getattr(adapter, "listen", None)) is not None:
            listen()
    # With --no-worker torch is never imported: the jobs wait for `easel worker` processes elsewhere.
    worker = None if args.no_worker else (await import_generation(args.debug)).build_worker(core)
    stop = asyncio.Event()

    def stop_all() -> None:
        if worker is not None:
            worker.stop()
        stop.set()

    _stop_on_signals(stop_all)
    names = ", ".join(adapter.platform for adapter in adapters) or "none (worker only)"
    print(f"Easel serving: database {core.settings.database_url_safe}; adapters: {names}"
          f"{'; no worker' if worker is None else ''}; Ctrl+C to stop", flush=True)
    if (warning := safety_warning(core.settings)) is not None:
        print(warning, file=sys.stderr, flush=True)
    # `easel imagine` on this data folder leaves its jobs to our worker, when there is one.
    with announce_worker(core.settings) if worker is not None else contextlib.nullcontext():
        async with asyncio.TaskGroup() as group:
            if worker is not None:
                group.create_task(worker.run(), name="easel-worker")
            for adapter in adapters:
                group.create_task(adapter.run(stop), name=f"easel-{adapter.platform}")
    return 0


async def _discord(core: Core, args: argparse.Namespace) -> int:
    from adapters.discord import DiscordAdapter

    names = await DiscordAdapter(core).sync_commands(args.guild)
    where = f"server {args.guild}" if args.guild else "every server (global commands may take up to an hour)"
    print(f"registered {len(names)} commands in {where}: {', '.join('/' + name for name in names)}")
    return 0


def configured_adapters(core: Core) -> list[Adapter]:
    """The chat adapters `easel serve` runs: each platform whose token is configured, and the HTTP
    API and web chat when enabled (by default, when no chat platform is configured, or when
    Telegram's updates come by webhook)."""
    settings = core.settings
    adapters: list[Adapter] = []
    if settings.discord.token is not None:
        from adapters.discord import DiscordAdapter

        adapters.append(DiscordAdapter(core))
    if settings.telegram.token is not None:
        from adapters.telegram import TelegramAdapter

        adapters.append(TelegramAdapter(core))
    http_enabled = settings.http.enabled
    if http_enabled is None:  # Telegram's webhook mode receives its updates through the HTTP server
        http_enabled = not adapters or bool(settings.telegram.webhook_url)
    if http_enabled:
        from adapters.http import HttpAdapter

        adapters.append(HttpAdapter(core))
    return adapters


def _stop_on_signals(stop: Callable[[], None]) -> None:
    """First Ctrl+C or SIGTERM: finish the batch in hand, then stop. Second: stop now (the job is requeued later)."""
    loop = asyncio.get_running_loop()

    def first_signal(received: signal.Signals) -> None:
        # A service manager stops it with SIGTERM, a person with Ctrl+C: each is told what it would send again.
        again = "Ctrl+C again" if received is signal.SIGINT else "another SIGTERM"
        print(f"stopping after the current batch ({again} to stop now)", file=sys.stderr, flush=True)
        stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, first_signal, sig)


COMMANDS: dict[str, Callable[[Core, argparse.Namespace], Awaitable[int]]] = {
    "imagine": _generate, "edit": _generate, "inpaint": _generate, "outpaint": _generate, "animate": _generate,
    "chat": _chat, "teach": _teach,
    "jobs": _jobs, "job": _job, "worker": _worker, "workers": _workers, "serve": _serve, "apikey": _apikey,
    "discord": _discord,
}


if __name__ == "__main__":
    sys.exit(main())
