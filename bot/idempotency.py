"""Looking up a request that already became a job, before doing the work of submitting it again.

`JobService.submit(..., idempotency_key=...)` is what guarantees one job per key (the key is stored
in the job's own transaction). A chat adapter that may see the same message twice (Telegram
redelivers updates it was never told were read) asks here first, so a repeat neither downloads the
attachments again nor shows the user a second reply.

Example:
    if await earlier_job(core.service, requester, "tg:-100123:42") is None:
        await core.service.submit(requester, command, inputs, idempotency_key="tg:-100123:42")
"""

from __future__ import annotations

from bot.domain import Requester
from bot.service import JobService
from bot.views import JobView, job_view


async def earlier_job(service: JobService, requester: Requester, key: str) -> JobView | None:
    """The job an earlier submit by this requester with this idempotency key queued, or None."""
    async with service.db.unit_of_work(write=False) as uow:
        job = await uow.jobs.for_idempotency_key(requester.platform, requester.user_id, key)
        return job_view(job, service.store.location_of) if job is not None else None
