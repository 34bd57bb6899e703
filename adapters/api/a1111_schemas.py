"""The AUTOMATIC1111 API's request and response bodies, with A1111's field names (modules/api/models.py).

Requests declare the fields A1111 clients send. Fields A1111 has and Easel does not use (hires fix,
face restoration, scripts, ControlNet's `alwayson_scripts`, SillyTavern's own `url`/`auth`...) are
accepted and dropped, as A1111 drops fields it does not know; README lists them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class GenerationRequest(BaseModel):
    """What txt2img and img2img share. A field left out takes Easel's default (the model's size,
    limits.default_steps...), not A1111's 512x512 at 50 steps."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(description="what to draw; A1111 draws from an empty prompt, Easel needs one",
                        json_schema_extra={"pattern": r"\S"})  # checked by the route, with a friendlier message
    negative_prompt: str | None = ""
    seed: int | None = Field(-1, description="-1: a random seed, as A1111")
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int | None = Field(1, description="batch_size × n_iter images, within limits.max_n")
    n_iter: int | None = 1
    sampler_name: str | None = Field(None, description="an A1111 name (GET /sdapi/v1/samplers) or Easel's")
    sampler_index: str | None = Field(None, description="the old name of sampler_name")
    scheduler: str | None = Field(None, description="automatic, or karras with DPM++ 2M")
    override_settings: dict[str, Any] | None = Field(
        None, description="only sd_model_checkpoint is used: the model of this request")
    override_settings_restore_afterwards: bool | None = True
    styles: list[str] | None = None
    subseed: int | None = -1
    subseed_strength: float | None = 0
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = None
    send_images: bool | None = Field(True, description="false: answer without the images")
    save_images: bool | None = False
    script_name: str | None = None
    script_args: list[Any] | None = None
    alwayson_scripts: dict[str, Any] | None = None


class Txt2ImgRequest(GenerationRequest):
    enable_hr: bool | None = False
    hr_scale: float | None = None
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = None
    denoising_strength: float | None = Field(None, description="hires fix only in A1111; not used here")


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] = Field(min_length=1, max_length=1,
                                   description="one base64 image (a data: URL works too)")
    mask: str | None = Field(None, description="base64: white pixels are repainted, black ones kept")
    denoising_strength: float | None = Field(None, description="how much of the image to repaint")
    inpainting_mask_invert: int | None = Field(0, description="1: black pixels are repainted instead")
    mask_blur: int | None = None
    inpainting_fill: int | None = None
    inpaint_full_res: bool | int | None = None
    inpaint_full_res_padding: int | None = None
    resize_mode: int | None = None
    include_init_images: bool | None = Field(False, description="echo init_images and mask in `parameters`")


class GenerationOut(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each with its `parameters` text chunk; withheld "
                                          "images are left out (info's `withheld` says why)")
    parameters: dict[str, Any] = Field(description="the request, echoed")
    info: str = Field(description="JSON: seed, all_seeds, infotexts... as A1111 writes it")


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field(description="a base64 PNG (a data: URL works too)")


class PngInfoOut(BaseModel):
    info: str = Field(description="the `parameters` text")
    items: dict[str, Any] = Field(description="the image's other text chunks")
    parameters: dict[str, Any] = Field(description="the `parameters` text taken apart: Prompt, Steps...")


class ProgressOut(BaseModel):
    progress: float = Field(description="0 to 1, of this key's current job")
    eta_relative: float = Field(description="seconds left, estimated")
    state: dict[str, Any]
    current_image: str | None = Field(None, description="base64 live preview, where the delivery rules "
                                                        "allow one (generation.previews)")
    textinfo: str | None = None


class A1111ErrorOut(BaseModel):
    """A1111's error shape: `error` is Easel's error code, `detail` and `errors` the message."""

    error: str
    detail: str
    body: str
    errors: str


ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": A1111ErrorOut} for status in (400, 401, 422, 429)}
GENERATION_ERRORS = {**ERRORS, **{status: {"model": A1111ErrorOut} for status in (403, 411, 413, 500, 504)}}
