"""A local stand-in for Discord's REST API and CDN, for driving the real discord.py client in tests.

It answers on 127.0.0.1 the routes Easel's adapter uses (login, interaction callbacks, webhook
edits and follow-ups, channel messages, command sync, attachment downloads), keeps the messages it
was sent, and records every request, so a test can assert what a user would see. It can also
misbehave the way Discord does: `fail_next` answers 429 (with `retry_after` and the `Via` header
discord.py looks for), 500 or any error; `expire_token` makes a token answer 401 Invalid Webhook
Token (code 50027), as Discord does once the 15 minutes are over.

Point discord.py at it with `discord.http.Route.BASE = fake.api_base` (webhooks use the same base).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

APPLICATION_ID = 900000000000000001
BOT_USER_ID = 900000000000000002
DISCORD_EPOCH_MS = 1420070400000


def snowflake(when: datetime | None = None, counter: int = 0) -> int:
    """A Discord id whose timestamp is `when` (Discord ids encode their creation time)."""
    when = when or datetime.now(UTC)
    return (int(when.timestamp() * 1000) - DISCORD_EPOCH_MS) << 22 | (counter & 0x3FFFFF)


@dataclass(frozen=True)
class SentFile:
    name: str
    content_type: str
    data: bytes


@dataclass
class Request:
    method: str
    path: str  # without the /api/v10 prefix
    query: dict[str, str]
    authorization: str | None
    json: dict[str, Any] | list[Any] | None
    files: list[SentFile]
    status: int = 0  # what the fake answered

    @property
    def content(self) -> str | None:
        return self.json.get("content") if isinstance(self.json, dict) else None

    @property
    def custom_ids(self) -> list[str]:
        """The custom ids of the buttons this request put on a message."""
        rows = self.json.get("components", []) if isinstance(self.json, dict) else []
        return [item["custom_id"] for row in rows or [] for item in row.get("components", [])
                if "custom_id" in item]


@dataclass
class _Failure:
    method: str
    path_part: str
    status: int
    body: dict[str, Any]
    times: int
    headers: dict[str, str] = field(default_factory=dict)
    when: Callable[[Request], bool] | None = None


class FakeDiscord:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.messages: dict[int, dict[str, Any]] = {}  # what users see now, by message id
        self.files: dict[int, list[SentFile]] = {}  # the files on each message
        self.attachments: dict[str, bytes] = {}
        self.downloads: list[str] = []  # attachment names fetched from the "CDN"
        self._original: dict[str, int] = {}  # interaction token -> its response message id
        self._expired: set[str] = set()
        self._failures: list[_Failure] = []
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/api/v10/{path:.*}", self._api)
        app.router.add_get("/attachments/{name}", self._cdn)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    # -- test controls ------------------------------------------------------------------------------

    def fail_next(self, method: str, path_part: str, status: int, *, times: int = 1,
                  retry_after: float = 0.05, code: int = 0, message: str = "",
                  when: Callable[[Request], bool] | None = None) -> None:
        """Answer the next `times` matching requests (and `when` they match) with `status`."""
        body: dict[str, Any] = {"message": message or f"fake error {status}", "code": code}
        headers: dict[str, str] = {}
        if status == 429:
            body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": False}
            headers = {"Via": "1.1 google", "Retry-After": str(retry_after),
                       "X-RateLimit-Scope": "user"}
        self._failures.append(_Failure(method, path_part, status, body, times, headers, when))

    def expire_token(self, token: str) -> None:
        """From now on the token is refused as Discord refuses it after 15 minutes."""
        self._expired.add(token)

    def add_attachment(self, name: str, data: bytes, content_type: str = "image/png",
                       size: int | None = None) -> dict[str, Any]:
        """Put a file on the fake CDN; returns the attachment object an interaction carries."""
        self.attachments[name] = data
        return {"id": str(snowflake(counter=next(self._ids))), "filename": name, "size": size or len(data),
                "url": f"http://127.0.0.1:{self.port}/attachments/{name}",
                "proxy_url": f"http://127.0.0.1:{self.port}/attachments/{name}", "content_type": content_type,
                "width": 64, "height": 64}

    def pressed_on(self, token: str, message_id: int) -> None:
        """A component interaction's @original is the message its button is on."""
        self._original[token] = message_id

    def original_message_id(self, token: str) -> int:
        """The id of the message an interaction's response created."""
        return self._original[token]

    def find(self, method: str, path_part: str = "", *, status: int | None = 200) -> list[Request]:
        return [r for r in self.requests if r.method == method and path_part in r.path
                and (status is None or r.status == status or (status == 200 and 200 <= r.status < 300))]

    async def wait_for(self, predicate: Callable[[Request], bool], timeout: float = 30) -> Request:
        """The first recorded request matching `predicate`, waiting for it if needed."""
        async def first() -> Request:
            while True:
                changed = self._changed
                for request in self.requests:
                    if predicate(request):
                        return request
                await changed.wait()

        return await asyncio.wait_for(first(), timeout)

    # -- the API ------------------------------------------------------------------------------------

    async def _api(self, http: web.Request) -> web.StreamResponse:
        request = await self._record(http)
        try:
            response = self._injected_failure(request) or self._expired_token(request) or self._route(request)
        except KeyError:
            response = _error(404, 10008, "Unknown Message")
        request.status = response.status
        self._changed.set()
        self._changed = asyncio.Event()
        return response

    async def _record(self, http: web.Request) -> Request:
        payload: Any = None
        files: list[SentFile] = []
        if http.content_type == "multipart/form-data":
            reader = await http.multipart()
            while (part := await reader.next()) is not None:
                data = await part.read()  # type: ignore[union-attr]
                if part.name == "payload_json":  # type: ignore[union-attr]
                    payload = json.loads(data)
                else:
                    files.append(SentFile(part.filename or "", part.headers.get("Content-Type", ""),  # type: ignore[union-attr]
                                          bytes(data)))
        elif http.can_read_body:
            payload = await http.json()
        request = Request(http.method, "/" + http.match_info["path"], dict(http.query),
                          http.headers.get("Authorization"), payload, files)
        self.requests.append(request)
        return request

    def _injected_failure(self, request: Request) -> web.Response | None:
        for failure in self._failures:
            if failure.times > 0 and failure.method == request.method and failure.path_part in request.path \
                    and (failure.when is None or failure.when(request)):
                failure.times -= 1
                return _json(failure.body, status=failure.status, headers=failure.headers)
        return None

    def _expired_token(self, request: Request) -> web.Response | None:
        parts = request.path.split("/")
        if len(parts) > 3 and parts[1] in ("webhooks", "interactions") and parts[3] in self._expired:
            return _error(401, 50027, "Invalid Webhook Token")
        return None

    def _route(self, request: Request) -> web.Response:
        parts = request.path.strip("/").split("/")
        method = request.method
        if parts == ["users", "@me"]:
            return _json(_user(BOT_USER_ID, "easel", bot=True))
        if parts == ["oauth2", "applications", "@me"]:
            return _json(_application())
        if parts[0] == "interactions" and parts[-1] == "callback":
            return self._interaction_callback(int(parts[1]), parts[2], request.json or {})
        if parts[0] == "webhooks" and len(parts) == 3 and method == "POST":
            return _json(self._new_message(0, request, webhook=True))
        if parts[0] == "webhooks" and len(parts) == 5:
            message_id = self._original[parts[2]] if parts[4] == "@original" else int(parts[4])
            if method == "DELETE":
                self.messages.pop(message_id)
                return web.Response(status=204)
            if method == "PATCH":
                self._update(self.messages[message_id], request)
            return _json(self.messages[message_id])
        if parts[0] == "channels" and parts[2:] == ["messages"] and method == "POST":
            return _json(self._new_message(int(parts[1]), request))
        if parts[0] == "channels" and len(parts) == 4 and method == "DELETE":
            self.messages.pop(int(parts[3]))
            return web.Response(status=204)
        if parts[0] == "applications" and parts[-1] == "commands" and method == "PUT":
            commands = [{**command, "id": str(snowflake(counter=next(self._ids))), "application_id":
                         str(APPLICATION_ID), "version": "1", "type": command.get("type", 1),
                         "default_member_permissions": None, "dm_permission": True, "nsfw": False}
                        for command in request.json or []]
            return _json(commands)
        return _error(404, 0, f"the fake has no route for {method} {request.path}")

    def _interaction_callback(self, interaction_id: int, token: str, body: dict[str, Any]) -> web.Response:
        kind = body.get("type")
        data = body.get("data") or {}
        interaction: dict[str, Any] = {"id": str(interaction_id), "type": 2}
        resource: dict[str, Any] = {"type": kind}
        if kind in (4, 5):  # a message (or a "thinking" placeholder for it) is created
            flags = int(data.get("flags") or 0)
            message = self._store_message(0, {"content": data.get("content", ""), "flags": flags}, [])
            self._original[token] = int(message["id"])
            interaction.update(response_message_id=message["id"], response_message_loading=kind == 5,
                               response_message_ephemeral=bool(flags & 64))
            if kind == 4:
                resource["message"] = message
        return _json({"interaction": interaction, "resource": resource})

    def _new_message(self, channel_id: int, request: Request, webhook: bool = False) -> dict[str, Any]:
        payload = request.json if isinstance(request.json, dict) else {}
        return self._store_message(channel_id, payload, request.files, webhook=webhook)

    def _store_message(self, channel_id: int, payload: dict[str, Any], files: list[SentFile],
                       webhook: bool = False) -> dict[str, Any]:
        message_id = snowflake(counter=next(self._ids))
        message = {
            "id": str(message_id), "channel_id": str(channel_id or 1), "type": 0,
            "author": _user(BOT_USER_ID, "easel", bot=True), "content": payload.get("content") or "",
            "timestamp": datetime.now(UTC).isoformat(), "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [],
            "embeds": [], "pinned": False, "flags": int(payload.get("flags") or 0),
            "components": payload.get("components") or [],
            "webhook_id": str(APPLICATION_ID) if webhook else None,
        }
        self._set_files(message, files)
        self.messages[message_id] = message
        return message

    def _update(self, message: dict[str, Any], request: Request) -> None:
        payload = request.json if isinstance(request.json, dict) else {}
        for key in ("content", "components"):
            if key in payload:
                message[key] = payload[key] or ([] if key == "components" else "")
        if "attachments" in payload or request.files:
            self._set_files(message, request.files)
        message["edited_timestamp"] = datetime.now(UTC).isoformat()

    def _set_files(self, message: dict[str, Any], files: list[SentFile]) -> None:
        message["attachments"] = [
            {"id": str(snowflake(counter=next(self._ids))), "filename": f.name, "size": len(f.data),
             "url": f"http://127.0.0.1:{self.port}/attachments/{f.name}", "proxy_url": "",
             "content_type": f.content_type} for f in files]
        self.files[int(message["id"])] = files  # the bytes, for tests to look at

    async def _cdn(self, http: web.Request) -> web.Response:
        name = http.match_info["name"]
        if name not in self.attachments:
            return web.Response(status=404)
        self.downloads.append(name)
        return web.Response(body=self.attachments[name], content_type="application/octet-stream")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # Exactly "application/json", as Discord sends it: discord.py decodes nothing else.
    return web.Response(body=json.dumps(body).encode(), status=status, headers={**(headers or {}),
                                                                       "Content-Type": "application/json"})


def _error(status: int, code: int, message: str) -> web.Response:
    return _json({"message": message, "code": code}, status=status)


def _user(user_id: int, name: str, bot: bool = False) -> dict[str, Any]:
    return {"id": str(user_id), "username": name, "discriminator": "0", "global_name": name, "avatar": None,
            "bot": bot, "public_flags": 0}


def _application() -> dict[str, Any]:
    return {"id": str(APPLICATION_ID), "name": "Easel", "description": "", "icon": None, "bot_public": True,
            "bot_require_code_grant": False, "owner": _user(1, "owner"), "verify_key": "00", "flags": 0,
            "summary": "", "team": None}
