// Easel web chat: a client of the public HTTP API (see adapters/http.py), with no build step.
// Identity: a per-browser key from POST /v1/sessions, kept in localStorage and sent as a bearer
// token; where the server gives no sessions, the page asks for an API key instead.
"use strict";

const $ = (selector) => document.querySelector(selector);
const log = $("#log");
const commandBox = $("#command");
const fileInput = $("#file");
const maskCanvas = $("#mask");
const preview = $("#preview");
const cursor = $("#cursor");
const TOKEN_KEY = "easel.token";
let token = localStorage.getItem(TOKEN_KEY);
let attached = null; // the File attached for /edit, /inpaint and /outpaint
let pictures = []; // the Files attached together for /teach (several at once)
let maskPainted = false;
const cards = new Map(); // job id -> its card in the log
const origins = new Map(); // job id -> the button that made it ("Upscale of image 1 of job k7mq2x9a")

// -- talking to the API ------------------------------------------------------------------------

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token}` };
  let payload = body;
  if (body && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: payload });
  const data = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const error = new Error(data?.message || `${response.status} ${response.statusText}`);
    error.status = response.status;
    error.code = data?.code;
    throw error;
  }
  return data;
}

async function ensureIdentity() {
  if (token) {
    try {
      await api("GET", "/v1/quota");
      return true;
    } catch (error) {
      if (error.status !== 401) throw error;
      localStorage.removeItem(TOKEN_KEY); // the server forgot it (a new database): get a new one
    }
  }
  const response = await fetch("/v1/sessions", { method: "POST" });
  if (response.ok) {
    token = (await response.json()).token;
    localStorage.setItem(TOKEN_KEY, token);
    return true;
  }
  $("#key-form").hidden = false;
  $("#composer").hidden = true;
  say((await response.json()).message, "error");
  $("#key").focus();
  return false;
}

// Server-sent events over fetch (EventSource cannot send the Authorization header).
async function* events(jobId) {
  const response = await fetch(`/v1/jobs/${jobId}/events`, { headers: { Authorization: `Bearer ${token}` } });
  if (!response.ok) throw new Error((await response.json()).message);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { kind: "message", data: "" };
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event.kind = line.slice(7);
        else if (line.startsWith("data: ")) event.data += line.slice(6);
      }
      yield { kind: event.kind, data: JSON.parse(event.data || "{}") };
    }
  }
}

// -- the conversation --------------------------------------------------------------------------

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "onclick") node.addEventListener("click", value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function say(text, kind = "bot") {
  const node = element("p", { class: kind, text });
  if (kind === "error") node.setAttribute("role", "alert");
  log.append(node);
  node.scrollIntoView({ block: "nearest" });
  return node;
}

function sayBlock(text) {
  const node = element("div", { class: "bot" }, element("pre", { text }));
  log.append(node);
  node.scrollIntoView({ block: "nearest" });
}

async function handle(text) {
  say(text, "user");
  const [name, ...args] = text.split(/\s+/);
  const command = name.toLowerCase();
  if (command === "/help") {
    sayBlock((await api("GET", "/v1/help")).text);
  } else if (command === "/quota") {
    sayBlock((await api("GET", "/v1/quota")).text);
  } else if (command === "/models" && !args.length) {
    sayBlock((await api("GET", "/v1/models")).text);
  } else if (command === "/styles" && !args.length) {
    sayBlock((await api("GET", "/v1/styles")).text);
  } else if (command === "/loras" && !args.length) {
    sayBlock((await api("GET", "/v1/loras")).text);
  } else if (command === "/job" && args.length === 1) {
    showJob(await api("GET", `/v1/jobs/${encodeURIComponent(args[0])}`));
  } else if (command === "/teach") {
    await teach(text);
  } else if (command === "/cancel" && args.length <= 1) {
    const id = args[0] || (await api("GET", "/v1/jobs?limit=20")).find((job) => !isFinal(job.status))?.id;
    if (!id) throw new Error("You have no queued or running job to cancel.");
    const job = await api("DELETE", `/v1/jobs/${encodeURIComponent(id)}`);
    say(`Job ${job.id} cancelled.`);
  } else {
    // /imagine, /edit, /inpaint, /outpaint, and anything else: the server's grammar answers typos too.
    await submit(text);
  }
}

async function submit(text) {
  let body = { command: text };
  if (attached) {
    body = new FormData();
    body.append("command", text);
    body.append("image", attached, attached.name);
    if (maskPainted) body.append("mask", await maskBlob(), "mask.png");
  }
  const job = await api("POST", "/v1/jobs", body);
  follow(job);
  // A permutation prompt (`a {red, green} circle`) queues one more job per further combination.
  for (const other of job.others || []) follow(other);
}

// /teach NAME [--steps N] [caption]: the pictures attached together are what it learns from.
async function teach(text) {
  const body = new FormData();
  body.append("command", text);
  for (const file of pictures.length ? pictures : attached ? [attached] : []) body.append("picture", file, file.name);
  const job = await api("POST", "/v1/trainings", body);
  say(`Teaching: ${job.cost_units} units. When it is done, the word works in your prompts.`);
  pictures = [];
  fileInput.value = "";
  follow(job);
}

function isFinal(status) {
  return ["succeeded", "failed", "cancelled"].includes(status);
}

// -- job cards ---------------------------------------------------------------------------------

function showJob(job) {
  const card = cardFor(job);
  log.append(card.node);
  render(card, job);
  card.node.scrollIntoView({ block: "nearest" });
  return card;
}

function cardFor(job) {
  const progress = element("progress", { max: "1", value: "0", "aria-label": `Progress of job ${job.id}` });
  const status = element("span", { class: "status" });
  const card = {
    node: element("article", { class: "job", "aria-label": `Job ${job.id}` },
      element("header", {}, element("strong", { text: `Job ${job.id}` }), status),
      ...(origins.has(job.id) ? [element("p", { class: "origin", text: origins.get(job.id) })] : []),
      element("p", { class: "prompt", text: `${job.kind}: ${job.prompt}${job.negative ? ` (not: ${job.negative})` : ""}` }),
      progress),
    status, progress, images: element("div", { class: "images" }), actions: element("div", { class: "actions" }),
  };
  card.node.append(card.images, card.actions);
  cards.set(job.id, card);
  return card;
}

function render(card, job) {
  const seeds = `seed${job.seeds.length > 1 ? "s" : ""} ${job.seeds.join(", ")}`;
  const words = {
    queued: job.position ? `queued, position ${job.position}` : "queued",
    running: "generating",
    succeeded: `done, ${seeds}`,
    failed: `failed: ${job.error}`,
    cancelled: "cancelled",
  };
  card.status.textContent = words[job.status];
  if (job.status === "failed") card.status.classList.add("error");
  if (job.progress.total) setProgress(card, job.progress.step, job.progress.total);
  // Only the images the server lets us show; a withheld one is a notice, a flagged one a blurred card.
  card.images.replaceChildren(...job.images.map((image) => figure(job, image)),
    ...job.withheld.map((item) => element("p", { class: "withheld", role: "note", text: item.message })));
  card.actions.replaceChildren();
  if (!isFinal(job.status)) {
    card.actions.append(element("button", { type: "button", text: "Cancel",
      "aria-label": `Cancel job ${job.id}`, onclick: () => run(() => handle(`/cancel ${job.id}`)) }));
  } else if (job.status === "succeeded") {
    card.actions.append(element("button", { type: "button", text: "Re-roll",
      "aria-label": `Re-roll job ${job.id} with a new seed`,
      onclick: () => run(async () => follow(await api("POST", `/v1/jobs/${job.id}/reroll`), `Re-roll of job ${job.id}`)) }));
  }
  if (isFinal(job.status)) card.progress.hidden = true;
}

function setProgress(card, step, total) {
  card.progress.max = total;
  card.progress.value = step;
  card.progress.setAttribute("aria-valuetext", `step ${step} of ${total}`);
}

function figure(job, image) {
  const n = image.index + 1;
  const followUp = (kind, label) => element("button", { type: "button", text: label,
    "aria-label": `${label} of image ${n} of job ${job.id}`,
    onclick: () => run(async () => follow(await api("POST", `/v1/jobs/${job.id}/${kind}`, { index: image.index }),
      `${label} of image ${n} of job ${job.id}`)) });
  // Zoom out and pan: an outpaint of this image (POST /v1/jobs/{id}/reframe, bot/followups.py's REFRAMES).
  const reframe = (action, text, label) => element("button", { type: "button", text,
    "aria-label": `${label} of image ${n} of job ${job.id}`,
    onclick: () => run(async () => follow(await api("POST", `/v1/jobs/${job.id}/reframe`, { index: image.index, action }),
      `${label} of image ${n} of job ${job.id}`)) });
  // An /animate clip plays in place of its poster (the last frame), which the server lets us show.
  const picture = job.video
    ? element("video", { src: job.video, controls: "", autoplay: "", loop: "", muted: "", playsinline: "",
      poster: image.url, "aria-label": `Clip of job ${job.id}: ${job.prompt}, seed ${image.seed}`,
      width: String(image.width), height: String(image.height) })
    : element("img", { src: image.url, alt: `Image ${n} of job ${job.id}: ${job.prompt}, seed ${image.seed}`,
      width: String(image.width), height: String(image.height) });
  const shown = image.spoiler ? spoiler(picture, `Image ${n} was flagged by the image check. Show it`)
    : job.video ? picture : element("a", { href: image.url, target: "_blank", rel: "noopener" }, picture);
  return element("figure", {}, shown,
    element("figcaption", {}, element("span", { class: "seed", text: `seed ${image.seed}` }),
      followUp("variations", "Variations"), followUp("upscale", "Upscale"),
      reframe("zoom15", "Zoom out 1.5x", "Zoom out 1.5x"), reframe("zoom2", "Zoom out 2x", "Zoom out 2x"),
      reframe("left", "⬅️", "Pan left"), reframe("up", "⬆️", "Pan up"), reframe("right", "➡️", "Pan right"),
      reframe("down", "⬇️", "Pan down")));
}

// A flagged picture where NSFW is allowed: blurred until the person clicks to show it.
function spoiler(picture, label) {
  picture.classList.add("spoilered");
  const button = element("button", { type: "button", class: "spoiler", "aria-label": label }, picture,
    element("span", { class: "spoiler-label", text: "Flagged: click to show" }));
  button.addEventListener("click", () => {
    picture.classList.remove("spoilered");
    button.replaceWith(picture);
  }, { once: true });
  return button;
}

// `origin` says which button made the job, for a follow-up: the server records only what to draw.
async function follow(job, origin) {
  if (origin) origins.set(job.id, origin);
  const card = showJob(job);
  try {
    for await (const event of events(job.id)) {
      if (event.kind === "queued") card.status.textContent = `queued, position ${event.data.position}`;
      else if (event.kind === "started") card.status.textContent = "generating";
      else if (event.kind === "progress") {
        setProgress(card, event.data.step, event.data.total);
        card.status.textContent = `generating, step ${event.data.step} of ${event.data.total}`;
        if (event.data.loss !== undefined) { // a /teach training: a slice ended
          card.status.textContent = `training, step ${event.data.step} of ${event.data.total}, loss ` +
            `${event.data.loss.toFixed(4)}, about ${Math.ceil(event.data.eta_s)} s left`;
          if (event.data.sample) {
            card.images.replaceChildren(element("img", { class: "preview", src: event.data.sample,
              alt: `Sample of training ${job.id} at step ${event.data.step}`, width: "128", height: "128" }));
          }
        }
        // Live preview (generation.previews): a rough picture of the image so far, replaced by the result.
        // The server sends previews only where they may be shown; preview_spoiler means blurred.
        if (event.data.preview) {
          card.images.replaceChildren(element("img", {
            class: event.data.preview_spoiler ? "preview spoilered" : "preview", src: event.data.preview,
            alt: `Preview of job ${job.id} at step ${event.data.step}`, width: "128", height: "128" }));
        }
      }
    }
  } finally {
    render(card, await api("GET", `/v1/jobs/${job.id}`));
    refreshSide();
  }
}

// The server says which prompts its default model draws (builtin:shapes knows only its captions' words).
async function showExamples() {
  const { examples } = await api("GET", "/v1/help");
  const first = `/imagine ${examples.prompts[0]}`;
  $("#first-step").replaceChildren("Type ", element("code", { text: `${first} --seed 42` }), " and press Enter.");
  commandBox.placeholder = `${first} --seed 4`;
  $("#examples-model").textContent = examples.model;
  $("#examples .examples").replaceChildren(...examples.prompts.map((prompt) => element("button", {
    type: "button", class: "example", text: prompt, "aria-label": `Put /imagine ${prompt} in the command box`,
    onclick: () => { commandBox.value = `/imagine ${prompt} `; commandBox.focus(); } })));
  $("#examples").hidden = false;
}

// -- history and quota -------------------------------------------------------------------------

async function refreshSide() {
  const [quota, jobs] = await Promise.all([api("GET", "/v1/quota"), api("GET", "/v1/jobs?limit=30")]);
  const units = (value) => Number(value.toFixed(2));
  $("#quota").textContent = quota.limit === null
    ? `${units(quota.used)} units used today`
    : `${units(quota.remaining)} of ${units(quota.limit)} units left today`;
  if (!jobs.length) $("#history").replaceChildren(element("li", { class: "meta", text: "No jobs yet." }));
  else $("#history").replaceChildren(...jobs.map((job) => element("li", {},
    element("button", { type: "button", onclick: () => run(async () => showJob(await api("GET", `/v1/jobs/${job.id}`))) },
      element("span", { text: `${origins.get(job.id) ?? job.kind}: ${job.prompt}` }),
      element("span", { class: "meta", text: `${job.id} · ${job.status} · ${new Date(job.created_at).toLocaleString()}` })))));
}

// -- attaching a picture and painting the mask -------------------------------------------------

fileInput.addEventListener("change", () => {
  if (fileInput.files.length > 1) { // several: pictures to teach from, not one to edit
    removeImage(false);
    pictures = [...fileInput.files];
    say(`Attached ${pictures.length} pictures. Type /teach NAME to teach a new word from them ` +
      "(e.g. /teach mascot --steps 300).");
    return;
  }
  pictures = [];
  const file = fileInput.files[0];
  if (!file) return;
  attached = file;
  const url = URL.createObjectURL(file);
  preview.onload = () => {
    maskCanvas.width = preview.naturalWidth;
    maskCanvas.height = preview.naturalHeight;
    clearMask();
    $("#attachment").hidden = false;
    $("#attachment").scrollIntoView({ block: "nearest" });
  };
  preview.onerror = () => { say(`${file.name} is not a picture this browser can show.`, "error"); removeImage(); };
  preview.src = url;
  say(`Attached ${file.name}. Type /edit with a prompt, /outpaint --zoom 2 to paint around it, or paint the mask and type /inpaint.`);
});

function removeImage(clearInput = true) {
  attached = null;
  if (clearInput) fileInput.value = "";
  $("#attachment").hidden = true;
  commandBox.focus();
}

function clearMask() {
  maskCanvas.getContext("2d").clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  maskPainted = false;
  $("#mask-state").textContent = "No mask painted: /edit uses the whole picture.";
}

const brush = { x: 0, y: 0 }; // in canvas pixels
function scale() {
  return maskCanvas.width / maskCanvas.getBoundingClientRect().width;
}

function paint(x, y) {
  const context = maskCanvas.getContext("2d");
  context.fillStyle = "rgba(255, 40, 90, 0.55)";
  context.beginPath();
  context.arc(x, y, (Number($("#brush").value) / 2) * scale(), 0, Math.PI * 2);
  context.fill();
  if (!maskPainted) {
    maskPainted = true;
    $("#mask-state").textContent = "Mask painted: /inpaint repaints the painted area.";
  }
}

function moveCursor() {
  const size = Number($("#brush").value);
  Object.assign(cursor.style, { left: `${brush.x / scale()}px`, top: `${brush.y / scale()}px`,
    width: `${size}px`, height: `${size}px` });
}

function pointerAt(event) {
  const box = maskCanvas.getBoundingClientRect();
  return [(event.clientX - box.left) * scale(), (event.clientY - box.top) * scale()];
}

function stroke(from, to) {
  const steps = Math.max(1, Math.ceil(Math.hypot(to[0] - from[0], to[1] - from[1]) / 2));
  for (let i = 1; i <= steps; i++) paint(from[0] + ((to[0] - from[0]) * i) / steps, from[1] + ((to[1] - from[1]) * i) / steps);
}

let last = null;
maskCanvas.addEventListener("pointerdown", (event) => {
  maskCanvas.setPointerCapture(event.pointerId);
  last = pointerAt(event);
  paint(...last);
});
maskCanvas.addEventListener("pointermove", (event) => {
  if (!last) return;
  const point = pointerAt(event);
  stroke(last, point);
  last = point;
});
maskCanvas.addEventListener("pointerup", () => { last = null; });
maskCanvas.addEventListener("focus", () => {
  if (!brush.x) Object.assign(brush, { x: maskCanvas.width / 2, y: maskCanvas.height / 2 });
  moveCursor();
});
maskCanvas.addEventListener("keydown", (event) => {
  const step = 8 * scale();
  const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
  if (event.key in moves) {
    const from = [brush.x, brush.y];
    brush.x = Math.min(Math.max(brush.x + moves[event.key][0], 0), maskCanvas.width);
    brush.y = Math.min(Math.max(brush.y + moves[event.key][1], 0), maskCanvas.height);
    if (event.shiftKey) stroke(from, [brush.x, brush.y]);
  } else if (event.key === " " || event.key === "Enter") {
    paint(brush.x, brush.y);
  } else {
    return;
  }
  event.preventDefault();
  moveCursor();
});

// White where painted, black elsewhere: the mask format every Easel platform takes.
function maskBlob() {
  const out = document.createElement("canvas");
  out.width = maskCanvas.width;
  out.height = maskCanvas.height;
  const painted = maskCanvas.getContext("2d").getImageData(0, 0, out.width, out.height);
  const context = out.getContext("2d");
  const pixels = context.createImageData(out.width, out.height);
  for (let i = 0; i < painted.data.length; i += 4) {
    const value = painted.data[i + 3] > 0 ? 255 : 0;
    pixels.data.set([value, value, value, 255], i);
  }
  context.putImageData(pixels, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

$("#clear-mask").addEventListener("click", clearMask);
$("#remove-image").addEventListener("click", removeImage);

// -- wiring ------------------------------------------------------------------------------------

async function run(action) {
  try {
    await action();
  } catch (error) {
    say(error.message, "error");
  }
}

$("#composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = commandBox.value.trim();
  if (!text) return;
  commandBox.value = "";
  run(() => handle(text));
});

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("#key").value.trim();
  localStorage.setItem(TOKEN_KEY, token);
  $("#key-form").hidden = true;
  $("#composer").hidden = false;
  run(async () => { if (await ensureIdentity()) await Promise.all([refreshSide(), showExamples()]); });
});

run(async () => {
  if (await ensureIdentity()) await Promise.all([refreshSide(), showExamples()]);
});
