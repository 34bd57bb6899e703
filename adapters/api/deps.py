"""What the routes share, through FastAPI's dependency injection rather than closures: `build_app` puts
the Core and the API keys on `app.state`, and a route asks for them by annotation (`core: CoreDep`,
`key: Key`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from bot.apikeys import ApiKeys, ApiKeyView
from bot.bootstrap import Core


def get_core(request: Request) -> Core:
    return request.app.state.core


def get_keys(request: Request) -> ApiKeys:
    return request.app.state.keys


CoreDep = Annotated[Core, Depends(get_core)]
KeysDep = Annotated[ApiKeys, Depends(get_keys)]

bearer = HTTPBearer(auto_error=False, description="an API key from `easel apikey create`, or POST /v1/sessions")
# The bearer token if one was sent; routes that need a key take `Key` instead.
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def current_key(keys: KeysDep, credentials: Credentials) -> ApiKeyView:
    return await keys.authenticate(credentials.credentials if credentials else None)


# The key a request was made with (401 without one): its jobs, quota and safety record are its own.
Key = Annotated[ApiKeyView, Depends(current_key)]
