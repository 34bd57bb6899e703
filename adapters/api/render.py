"""Translating out: a Delivery (bot/delivery.py decides what may be shown) becomes the JSON the API
answers with, an SSE event's data or a webhook's body. Nothing here reads a job's images or safety flags
itself."""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request

from bot.bootstrap import Core
from bot.delivery import Delivery, offers_gif
from bot.domain import GenerationParams
from bot.events import EventKind
from bot.policy import describe_quota
from bot.views import QuotaStatus


def base_url(core: Core, request: Request | None = None) -> str:
    if core.settings.http.public_url:
        return core.settings.http.public_url.rstrip("/")
    if request is not None:
        return str(request.base_url).rstrip("/")
    return f"http://{core.settings.http.host}:{core.settings.http.port}"


def image_url(base: str, sha256: str) -> str:
    return f"{base}/v1/images/{sha256}"


def params_out(p: GenerationParams) -> dict[str, Any]:
    """The settings a job runs with (ParamsOut), as a job and a dry run show them."""
    return {"width": p.width, "height": p.height, "steps": p.steps, "cfg": p.cfg, "n": p.n, "sampler": p.sampler,
            "model": p.model, "seed": p.seed, "strength": p.strength,
            "loras": [{"name": name, "weight": weight} for name, weight in p.loras]}


def job_out(delivery: Delivery, base: str, position: int | None = None) -> dict[str, Any]:
    """A job as the API shows it: only the images that may be shown (with `spoiler`), and a notice for
    each withheld one (bot/delivery.py decides which)."""
    job, p = delivery.job, delivery.job.params

    def when(moment: Any) -> str | None:
        return moment.isoformat() if moment else None

    return {
        "id": job.id, "status": job.status.value, "kind": p.kind.value, "prompt": p.prompt, "negative": p.negative,
        "params": params_out(p),
        "seeds": job.seeds, "position": position,
        "progress": {"step": job.progress_step, "total": job.progress_total},
        "images": images_out(delivery, base),
        "withheld": withheld_out(delivery),
        "notice": delivery.notice or None,
        "inputs": {"image": image_url(base, job.init_image_sha) if job.init_image_sha else None,
                   "mask": image_url(base, job.mask_image_sha) if job.mask_image_sha else None},
        # An animation's clip goes where its poster may (bot/delivery.py decided that for the poster).
        "video": f"{base}/v1/videos/{delivery.images[0].sha256}" if p.motion is not None and delivery.images else None,
        "gif": f"{base}/v1/gifs/{delivery.images[0].sha256}"
        if p.motion is not None and delivery.images and offers_gif("http") else None,
        "error": job.error,
        "created_at": when(job.created_at), "started_at": when(job.started_at),
        "finished_at": when(job.finished_at),
        "links": {"self": f"{base}/v1/jobs/{job.id}", "events": f"{base}/v1/jobs/{job.id}/events"},
    }


def images_out(delivery: Delivery, base: str) -> list[dict[str, Any]]:
    return [{"index": i.index, "seed": i.seed, "url": image_url(base, i.sha256), "width": i.width,
             "height": i.height, "spoiler": i.spoiler} for i in delivery.images]


def withheld_out(delivery: Delivery) -> list[dict[str, Any]]:
    return [{"index": w.index, "seed": w.seed, "category": w.category, "message": w.message}
            for w in delivery.withheld]


def event_data(delivery: Delivery, base: str) -> dict[str, Any]:
    """One SSE event's data: what the delivery may show, with image links instead of file paths."""
    data: dict[str, Any] = {"job_id": delivery.job.id}
    kind = delivery.kind
    if kind is EventKind.QUEUED:
        data["position"] = delivery.position
    elif kind is EventKind.STARTED:
        data["batch_size"] = delivery.batch_size
    elif kind is EventKind.PROGRESS:
        data.update(step=delivery.step, total=delivery.total)
        if delivery.preview is not None:
            data.update(preview=delivery.preview, preview_spoiler=delivery.preview_spoiler)
        if delivery.loss is not None:  # a /teach training's slice ended
            data.update(loss=delivery.loss, eta_s=delivery.eta_s)
            if delivery.sample is not None:
                data["sample"] = delivery.sample
    elif kind in (EventKind.DONE, EventKind.RELEASED):
        data.update(images=images_out(delivery, base), withheld=withheld_out(delivery))
        if delivery.notice:
            data["notice"] = delivery.notice
    elif kind is EventKind.FAILED:
        data["error"] = delivery.error
    return data


def quota_out(status: QuotaStatus) -> dict[str, Any]:
    def finite(value: float) -> float | None:  # JSON has no infinity: null = no limit
        return None if math.isinf(value) else round(value, 3)

    return {"tier": status.tier, "used": round(status.used, 3), "limit": finite(status.limit),
            "remaining": finite(status.remaining), "reserved": round(status.reserved, 3),
            "resets_at": status.resets_at.isoformat(),
            "minute": {"used": round(status.minute_used, 3), "limit": finite(status.minute_limit)},
            "images": {"used": status.images_used, "limit": status.images_limit or None},
            "text": describe_quota(status)}
