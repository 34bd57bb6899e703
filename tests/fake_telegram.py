"""A fake Telegram Bot API server on 127.0.0.1, for running the real python-telegram-bot against.

It speaks the Bot API's HTTP protocol (form and multipart requests in, `{"ok": ..., "result": ...}`
out) closely enough for `Application`, long polling and file transfers to run unchanged, and it
keeps what a person in each chat would see: the bot's messages with their latest text, photos,
albums, files and buttons. Tests script what users do (`send`, `press`) and can make the next calls
of a method (to any chat, or to one) fail with 429 (flood control, with `retry_after`) or a 5xx.
Once the bot calls setWebhook, updates are posted to its webhook as Telegram posts them (with the
secret token it was given), through `webhook_proxy` (the TLS proxy in front of the bot), and
getUpdates answers 409 Conflict, as Telegram does.

    async with FakeTelegram() as fake:
        settings.telegram.base_url, settings.telegram.base_file_url = fake.base_url, fake.base_file_url
        fake.send(chat=fake.private(7), text="/imagine a cat")
        ...
        assert fake.chat(7)[-1].photo is not None
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

BOT_USER = {"id": 4242, "is_bot": True, "first_name": "Easel", "username": "easel_test_bot"}
TOKEN = "4242:TEST-TOKEN"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"

# Parameters sent as plain strings; every other parameter is JSON-encoded by python-telegram-bot.
_RAW_PARAMETERS = {"text", "caption", "file_id", "callback_query_id", "parse_mode", "url", "secret_token"}


@dataclass
class Call:
    """One request the bot made."""

    method: str
    params: dict[str, Any]
    files: dict[str, bytes]
    at: float  # time.monotonic() when it arrived
    status: int = 200  # what the fake answered


@dataclass
class BotMessage:
    """A message the bot sent, as the chat shows it now (edits applied)."""

    message_id: int
    chat_id: int
    text: str | None = None  # text messages
    caption: str | None = None  # photos and documents
    photo: bytes | None = None
    document: bytes | None = None
    animation: bytes | None = None  # sendAnimation: an MP4 that plays inline
    filename: str | None = None
    media_group_id: str | None = None
    reply_to: int | None = None  # the message it answers
    buttons: list[list[dict[str, Any]]] = field(default_factory=list)  # rows of {"text", "callback_data"}
    has_spoiler: bool = False
    edits: list[float] = field(default_factory=list)  # when each edit arrived
    history: list[str] = field(default_factory=list)  # every text it has shown, the current one last

    @property
    def shown(self) -> str:
        return self.text if self.text is not None else (self.caption or "")

    def button(self, label_start: str) -> dict[str, Any]:
        for row in self.buttons:
            for button in row:
                if button["text"].startswith(label_start):
                    return button
        raise AssertionError(f"no button starting {label_start!r} on {self.shown!r}: {self.buttons}")


class FakeTelegram:
    def __init__(self, admins: dict[int, list[int]] | None = None) -> None:
        self.calls: list[Call] = []
        self.served: list[int] = []  # the update ids getUpdates has handed out, repeats included
        self.messages: dict[int, dict[int, BotMessage]] = {}  # chat id -> message id -> message
        self.admins = admins or {}  # chat id -> administrator user ids (getChatAdministrators)
        self._files: dict[str, bytes] = {}
        self._pending: list[dict[str, Any]] = []  # updates not yet confirmed by an offset
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1000)
        self._file_ids = itertools.count(1)
        self._new_update = asyncio.Event()
        self._failures: dict[tuple[str, int | None], list[tuple[int, int | None]]] = {}  # (method, chat)
        self.slow_files: dict[str, asyncio.Event] = {}  # file id -> download held until the event is set
        self.webhook: dict[str, Any] | None = None  # setWebhook's parameters, while a webhook is set
        self.webhook_proxy: str | None = None  # where the webhook URL's https://host leads ("http://127.0.0.1:N")
        self.webhook_posts: list[tuple[int, int]] = []  # (update_id, HTTP status) of each update posted
        self._posting: set[asyncio.Task[int]] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- the server -------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeTelegram:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._file)
        # A long poll in progress must not hold up the end of a test: stop it at once.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._posting:
            task.cancel()
        await asyncio.gather(*self._posting, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    async def _api(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != TOKEN:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        params, files = await _read_parameters(request)
        call = Call(method, params, files, time.monotonic())
        self.calls.append(call)
        failures = self._failures.get((method, params.get("chat_id"))) or self._failures.get((method, None))
        if failures:
            status, retry_after = failures.pop(0)
            call.status = status
            if status == 429:
                return _error(429, f"Too Many Requests: retry after {retry_after}",
                              {"retry_after": retry_after})
            return _error(status, "Bad Gateway" if status == 502 else "Internal Server Error")
        if method == "getUpdates" and self.webhook is not None:
            call.status = 409
            return _error(409, "Conflict: can't use getUpdates method while webhook is active; use "
                               "deleteWebhook to delete the webhook first")
        handler = getattr(self, f"_{method}", None)
        if handler is None:
            return web.json_response({"ok": True, "result": True})  # setMyCommands...
        try:
            result = handler(params, files) if method != "getUpdates" else await handler(params, files)
        except _BadRequest as e:
            call.status = 400
            return _error(400, f"Bad Request: {e}")
        return web.json_response({"ok": True, "result": result})

    async def _file(self, request: web.Request) -> web.Response:
        file_id = request.match_info["path"].rsplit("/", 1)[-1]
        if request.match_info["token"] != TOKEN or file_id not in self._files:
            return web.Response(status=404)
        if file_id in self.slow_files:
            await self.slow_files[file_id].wait()
        return web.Response(body=self._files[file_id])

    # -- what users do ----------------------------------------------------------------------------

    @staticmethod
    def private(user_id: int) -> dict[str, Any]:
        return {"id": user_id, "type": "private", "first_name": f"User{user_id}"}

    @staticmethod
    def group(chat_id: int, title: str = "Artists") -> dict[str, Any]:
        return {"id": chat_id, "type": "supergroup", "title": title}

    @staticmethod
    def user(user_id: int) -> dict[str, Any]:
        return {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"}

    def send(self, chat: dict[str, Any], text: str | None = None, *, user: int | None = None,
             photo: bytes | None = None, document: bytes | None = None, filename: str = "image.png",
             caption: str | None = None, reply_to: dict[str, Any] | None = None,
             media_group_id: str | None = None) -> dict[str, Any]:
        """A user sends a message; returns the message (to reply to it later)."""
        message: dict[str, Any] = {
            "message_id": next(self._message_ids), "date": int(time.time()), "chat": chat,
            "from": self.user(user if user is not None else chat["id"]),
        }
        if text is not None:
            message["text"] = text
            message["entities"] = _command_entity(text)
        if caption is not None:
            message["caption"] = caption
            message["caption_entities"] = _command_entity(caption)
        if photo is not None:
            # Telegram offers several sizes, smallest first; the bot should take the largest.
            message["photo"] = [self._add_file(b"thumbnail", width=90, height=90),
                                self._add_file(photo, width=800, height=600)]
        if document is not None:
            message["document"] = {**self._add_file(document), "file_name": filename,
                                   "mime_type": "image/png"}
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        if media_group_id is not None:
            message["media_group_id"] = media_group_id
        self.deliver({"message": message})
        return message

    def press(self, chat: dict[str, Any], message: BotMessage, button: dict[str, Any],
              user: int | None = None) -> dict[str, Any]:
        """A user presses an inline button under one of the bot's messages."""
        update = {"callback_query": {
            "id": f"cb{next(self._file_ids)}", "from": self.user(user if user is not None else chat["id"]),
            "chat_instance": "ci", "data": button["callback_data"],
            "message": {"message_id": message.message_id, "date": int(time.time()), "chat": chat,
                        "from": BOT_USER, "text": message.shown or "."},
        }}
        self.deliver(update)
        return update

    def deliver(self, update: dict[str, Any], update_id: int | None = None) -> dict[str, Any]:
        """Queue an update for getUpdates (again, with its old `update_id`, to redeliver it), or post it
        to the webhook when one is set."""
        update = {**update, "update_id": update_id if update_id is not None else next(self._update_ids)}
        if self.webhook is not None:
            task = asyncio.get_running_loop().create_task(self.post_to_webhook(update))
            self._posting.add(task)
            task.add_done_callback(self._posting.discard)
            return update
        self._pending.append(update)
        self._new_update.set()
        return update

    async def post_to_webhook(self, update: dict[str, Any], headers: dict[str, str] | None = None) -> int:
        """Post an update to the webhook as Telegram does: JSON, with the secret token setWebhook was
        given (unless `headers` replaces them). Returns the HTTP status the bot answered."""
        assert self.webhook is not None and self.webhook_proxy is not None, "no webhook set, or no proxy to it"
        url = urlsplit(self.webhook["url"])
        target = self.webhook_proxy + url.path + (f"?{url.query}" if url.query else "")
        if headers is None:
            secret = self.webhook.get("secret_token")
            headers = {SECRET_HEADER: secret} if secret else {}
        async with aiohttp.ClientSession() as session, session.post(
                target, data=json.dumps(update), headers={"Content-Type": "application/json", **headers}) as answer:
            status = answer.status
        self.webhook_posts.append((update["update_id"], status))
        return status

    def fail_next(self, method: str, status: int = 429, *, times: int = 1, retry_after: int | None = 1,
                  chat: int | None = None) -> None:
        """Answer the next `times` calls of `method` (to `chat` only, when given) with `status` (429
        carries `retry_after`)."""
        self._failures.setdefault((method, chat), []).extend([(status, retry_after)] * times)

    # -- what tests look at -----------------------------------------------------------------------

    def chat(self, chat_id: int) -> list[BotMessage]:
        """The bot's messages in a chat, oldest first, as the chat shows them now."""
        return sorted(self.messages.get(chat_id, {}).values(), key=lambda m: m.message_id)

    def calls_of(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    async def wait_for(self, predicate: Any, timeout: float = 60.0, what: str = "") -> Any:
        """Poll until `predicate()` (a function or coroutine function) is truthy; fail with what the
        chats show when it never is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(0.02)
        shown = {chat: [m.shown for m in self.chat(chat)] for chat in self.messages}
        raise AssertionError(f"timed out waiting for {what or predicate}; chats show {shown}")

    # -- Bot API methods --------------------------------------------------------------------------

    def _getMe(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return BOT_USER

    async def _getUpdates(self, params: dict[str, Any], files: dict[str, bytes]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        # An offset confirms every update below it: Telegram forgets those.
        self._pending = [u for u in self._pending if u["update_id"] >= offset]
        if not self._pending:
            self._new_update.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_update.wait(), timeout=float(params.get("timeout") or 0))
        served = [u for u in self._pending if u["update_id"] >= offset]
        self.served.extend(u["update_id"] for u in served)
        return served

    def _setWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        self.webhook = params
        return True

    def _deleteWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        self.webhook = None
        return True

    def _getFile(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        file_id = params["file_id"]
        if file_id not in self._files:
            raise _BadRequest("invalid file_id")
        return {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_size": len(self._files[file_id]),
                "file_path": f"documents/{file_id}"}

    def _getChatAdministrators(self, params: dict[str, Any], files: dict[str, bytes]) -> list[dict[str, Any]]:
        return [{"status": "administrator", "user": self.user(user_id), "can_be_edited": False,
                 "is_anonymous": False, "can_manage_chat": True, "can_delete_messages": True,
                 "can_manage_video_chats": True, "can_restrict_members": True, "can_promote_members": False,
                 "can_change_info": True, "can_invite_users": True, "can_post_stories": False,
                 "can_edit_stories": False, "can_delete_stories": False}
                for user_id in self.admins.get(int(params["chat_id"]), [])]

    def _sendMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return self._record(params, BotMessage(0, 0, text=params["text"]))

    def _sendPhoto(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        message = BotMessage(0, 0, caption=params.get("caption"), photo=files.get("photo"),
                             has_spoiler=bool(params.get("has_spoiler")))
        return self._record(params, message)

    def _sendAnimation(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        message = BotMessage(0, 0, caption=params.get("caption"), animation=files.get("animation"),
                             has_spoiler=bool(params.get("has_spoiler")))
        return self._record(params, message)

    def _sendDocument(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return self._record(params, BotMessage(0, 0, caption=params.get("caption"),
                                               document=files.get("document")))

    def _sendMediaGroup(self, params: dict[str, Any], files: dict[str, bytes]) -> list[dict[str, Any]]:
        group_id = f"album{next(self._file_ids)}"
        sent = []
        for item in params["media"]:
            data = files[item["media"].removeprefix("attach://")]
            message = BotMessage(0, 0, caption=item.get("caption"), media_group_id=group_id,
                                 has_spoiler=bool(item.get("has_spoiler")))
            if item["type"] == "photo":
                message.photo = data
            else:
                message.document = data
            sent.append(self._record(params, message))
        return sent

    def _editMessageText(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        message = self.messages.get(int(params["chat_id"]), {}).get(int(params["message_id"]))
        if message is None:
            raise _BadRequest("message to edit not found")
        if message.text == params["text"] and message.buttons == _buttons(params):
            raise _BadRequest("message is not modified: specified new message content and reply markup "
                              "are exactly the same as a current content and reply markup of the message")
        message.text = params["text"]
        message.buttons = _buttons(params)
        message.edits.append(time.monotonic())
        message.history.append(message.text)
        return self._as_json(message)

    def _answerCallbackQuery(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        return True

    # -- helpers ----------------------------------------------------------------------------------

    def _add_file(self, data: bytes, **extra: Any) -> dict[str, Any]:
        file_id = f"file{next(self._file_ids)}"
        self._files[file_id] = data
        return {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_size": len(data), **extra}

    def _record(self, params: dict[str, Any], message: BotMessage) -> dict[str, Any]:
        message.chat_id = int(params["chat_id"])
        message.message_id = next(self._message_ids)
        reply = params.get("reply_parameters") or {}
        message.reply_to = reply.get("message_id") or params.get("reply_to_message_id")
        message.buttons = message.buttons or _buttons(params)
        message.history.append(message.shown)
        self.messages.setdefault(message.chat_id, {})[message.message_id] = message
        return self._as_json(message)

    def _as_json(self, message: BotMessage) -> dict[str, Any]:
        chat = {"id": message.chat_id, "type": "private" if message.chat_id > 0 else "supergroup"}
        data: dict[str, Any] = {"message_id": message.message_id, "date": int(time.time()), "chat": chat,
                                "from": BOT_USER}
        if message.text is not None:
            data["text"] = message.text
        if message.caption is not None:
            data["caption"] = message.caption
        if message.photo is not None:
            data["photo"] = [self._add_file(message.photo, width=64, height=64)]
        if message.document is not None:
            data["document"] = self._add_file(message.document)
        if message.animation is not None:
            data["animation"] = {**self._add_file(message.animation), "width": 64, "height": 64, "duration": 1}
        if message.media_group_id:
            data["media_group_id"] = message.media_group_id
        return data


class _BadRequest(Exception):
    pass


def _error(status: int, description: str, parameters: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=status)


def _command_entity(text: str) -> list[dict[str, Any]]:
    """The bot_command entity Telegram marks a leading /command with (CommandHandler looks for it)."""
    if not text.startswith("/"):
        return []
    return [{"type": "bot_command", "offset": 0, "length": len(text.split(maxsplit=1)[0])}]


def _buttons(params: dict[str, Any]) -> list[list[dict[str, Any]]]:
    markup = params.get("reply_markup") or {}
    return markup.get("inline_keyboard", [])


async def _read_parameters(request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Form fields (JSON-decoded where python-telegram-bot encoded them) and uploaded files."""
    params: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    form = await request.post() if request.body_exists else {}
    for name, value in {**request.query, **form}.items():
        if isinstance(value, web.FileField):
            files[name] = value.file.read()
        elif name in _RAW_PARAMETERS:
            params[name] = value
        else:
            try:
                params[name] = json.loads(value)
            except (TypeError, ValueError):
                params[name] = value
    return params, files
