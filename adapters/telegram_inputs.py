"""Finding and downloading the pictures of /edit, /inpaint, /outpaint and /teach on Telegram.

A picture can be the message's own photo or image file, the picture of the message it replies to,
or (for /inpaint) come with its mask as an album: Telegram delivers an album as separate messages
sharing a `media_group_id`, usually with the caption on the first, so `Albums` remembers recent
album items and lets the captioned one wait briefly for the rest. The mask can also be the replied-
to picture, or the picture's own transparency.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from telegram import Bot, Document, Message, PhotoSize
from telegram.error import BadRequest

from bot.config import LimitsConfig
from bot.domain import InputImages, JobKind, TrainingPicture
from bot.errors import InvalidCommand, InvalidImage
from bot.images import load_upload

Media = PhotoSize | Document

NO_PICTURE = ("/{kind} needs a picture: send one with /{kind} <prompt> as its caption, or reply "
              "/{kind} <prompt> to a message that holds it")
NO_MASK = ("/inpaint needs a mask (white = repaint): send the picture and the mask as one album, "
           "picture first, with the caption on it; or reply with the captioned picture to the mask; "
           "or send a PNG as a file whose transparent pixels mark what to repaint")


def media_of(message: Message | None) -> Media | None:
    """The picture a message holds: its largest photo size, or a document (an image sent as a file)."""
    if message is None:
        return None
    if message.photo:
        return message.photo[-1]  # sizes come smallest first
    if message.document is not None:
        return message.document  # load_upload decides whether the bytes are a usable picture
    return None


class Albums:
    """The items of recent albums, by media_group_id, so an album's caption can find its mask."""

    def __init__(self, wait_s: float, keep: int = 500) -> None:
        self._wait_s = wait_s
        self._keep = keep
        self._items: OrderedDict[str, dict[int, Message]] = OrderedDict()
        self._last_added: dict[str, float] = {}

    def add(self, message: Message) -> None:
        group = message.media_group_id
        if group is None:
            return
        self._items.setdefault(group, {})[message.message_id] = message
        self._items.move_to_end(group)
        self._last_added[group] = time.monotonic()
        while len(self._items) > self._keep:
            old, _ = self._items.popitem(last=False)
            self._last_added.pop(old, None)

    async def complete(self, message: Message) -> list[Message]:
        """Every item of the message's album, in order, once none has arrived for `wait_s`."""
        group = message.media_group_id
        if group is None:
            return [message]
        self.add(message)
        while (left := self._last_added[group] + self._wait_s - time.monotonic()) > 0:
            await asyncio.sleep(left)
        return [self._items[group][key] for key in sorted(self._items[group])]


async def gather_inputs(bot: Bot, message: Message, kind: JobKind, albums: Albums,
                        limits: LimitsConfig) -> InputImages:
    """The picture (and mask) a generation command refers to, downloaded. Raises InvalidImage."""
    own = media_of(message)
    if kind is JobKind.IMAGINE:
        if own is not None:
            raise InvalidCommand("/imagine takes no picture; to start from this one, use /edit <prompt>")
        return InputImages()
    replied = media_of(message.reply_to_message)
    if kind is JobKind.ANIMATE:  # a picture, if one comes with it, is the clip's first frame
        picture = own or replied
        return InputImages(image=await download(bot, picture, limits, "image")) if picture else InputImages()
    if own is None:
        picture, mask = replied, None
    else:
        album = [m for m in await albums.complete(message) if media_of(m) is not None]
        pictures = [media_of(m) for m in album] if len(album) > 1 else [own]
        picture = pictures[0]
        mask = pictures[1] if len(pictures) > 1 else replied
    if picture is None:
        raise InvalidImage(NO_PICTURE.format(kind=kind.value))
    if kind in (JobKind.EDIT, JobKind.OUTPAINT):  # /outpaint makes its own mask
        return InputImages(image=await download(bot, picture, limits, "image"))
    if mask is None:
        image = await download(bot, picture, limits, "image")
        if not has_transparent_pixels(image, limits):
            raise InvalidImage(NO_MASK)
        return InputImages(image=image, mask=image)  # the service reads a transparent mask's alpha
    image_bytes, mask_bytes = await asyncio.gather(download(bot, picture, limits, "image"),
                                                   download(bot, mask, limits, "mask"))
    return InputImages(image=image_bytes, mask=mask_bytes)


NO_TRAINING_PICTURES = ("/teach needs pictures: send them as one album (up to 10 a message) with /teach NAME as "
                        "the caption of one of them; each other picture's caption is its own")


async def gather_training_pictures(bot: Bot, message: Message, albums: Albums,
                                   limits: LimitsConfig) -> list[TrainingPicture]:
    """The pictures of /teach: the album the command is the caption of, each with its own caption (the
    command's picture has none: the command's shared caption, else the trigger word, stands in)."""
    album = [item for item in await albums.complete(message) if media_of(item) is not None]
    if not album:
        raise InvalidImage(NO_TRAINING_PICTURES)
    data = await asyncio.gather(*(download(bot, media_of(item), limits, f"picture {number}")  # type: ignore[arg-type]
                                  for number, item in enumerate(album, 1)))
    return [TrainingPicture(picture, "" if item.message_id == message.message_id else (item.caption or ""),
                            f"picture {number}")
            for number, (item, picture) in enumerate(zip(album, data, strict=True), 1)]


async def download(bot: Bot, media: Media, limits: LimitsConfig, what: str) -> bytes:
    """The file's bytes; refuses, before downloading, a file larger than limits.max_upload_bytes."""
    if media.file_size is not None and media.file_size > limits.max_upload_bytes:
        megabytes = limits.max_upload_bytes / (1024 * 1024)
        raise InvalidImage(f"the {what} is {media.file_size / (1024 * 1024):.1f} MB; the limit is "
                           f"{megabytes:g} MB; send a smaller or more compressed file")
    try:
        file = await bot.get_file(media.file_id)
    except BadRequest as error:
        if "too big" in str(error).lower():
            raise InvalidImage(f"the {what} is larger than Telegram lets bots download (20 MB); send a "
                               "smaller file (operators: your own Bot API server, telegram.base_url, "
                               "lifts this limit)") from None
        raise
    return bytes(await file.download_as_bytearray())


def has_transparent_pixels(data: bytes, limits: LimitsConfig) -> bool:
    image = load_upload(data, limits, "image")
    return image.mode == "RGBA" and image.getchannel("A").getextrema()[0] < 255
