"""The HTTP API's routers, one module per resource; adapters/http.py composes them into the app.

    jobs.py        POST/GET/DELETE /v1/jobs..., events, and the follow-ups (reroll, variations, upscale, reframe)
    images.py      GET /v1/images/{sha256}
    account.py     GET /v1/quota, /v1/models (OpenAI's list shape), /v1/models/{id}, /v1/help
    openai_images.py  POST /v1/images/generations, edits, variations: the OpenAI Images API
    operations.py  the web chat page, POST /v1/sessions, /healthz, /metrics
    deps.py        what routes share through FastAPI's dependency injection: the Core, the API key
    schemas.py     request and response bodies (also the OpenAPI schema)
    parse.py       a request body → a chat command and input images
    render.py      a Delivery → the JSON the API shows
    errors.py      EaselError → status code and `{"code", "message"}`
"""
