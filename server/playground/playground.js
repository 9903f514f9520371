// The playground: one page over the HTTP API (no framework, nothing fetched from elsewhere).
// GET /v1/models fills the pickers; Run posts the image as multipart/form-data to /v1/jobs:run and reads
// the Server-Sent Events as they arrive; RESULT and DONE events carry the result drawn over the image.
"use strict";

const $ = (id) => document.getElementById(id);
const TEXT_TASKS = new Set(["CAPTION_TO_PHRASE_GROUNDING", "REFERRING_EXPRESSION_SEGMENTATION",
  "OPEN_VOCABULARY_DETECTION"]);
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];
const short = (name) => name.replace(/^[A-Z]+_TYPE_/, "");

const state = { models: [], file: null, image: null, region: null, drag: null, result: null, running: false };

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function errorText(status) {
  const info = (status.details || []).find((d) => d["@type"].endsWith("google.rpc.ErrorInfo"));
  return info ? `${info.reason}: ${status.message}` : status.message || "request failed";
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return { message: `HTTP ${response.status}` };
  }
}

// -- models and tasks ------------------------------------------------------------------------------

async function loadModels() {
  const response = await fetch("/v1/models", { headers: authHeaders() });
  const body = await readJson(response);
  if (!response.ok) {
    say(errorText(body), true);
    return;
  }
  state.models = body.models || [];
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...state.models.map((model) => {
    const option = new Option(`${model.name} (${model.liveWorkers} live)`, model.name);
    option.selected = model.name === chosen;
    return option;
  }));
  if (!state.models.length) say("no model has a worker yet: start one (florence2 worker --model ...)", true);
  else if (!$("status").classList.contains("busy")) say("");
  onModel();
}

function currentModel() {
  return state.models.find((model) => model.name === $("model").value);
}

function onModel() {
  const model = currentModel();
  const tasks = model ? model.tasks.map(short) : [];
  const chosen = $("task").value || "OD";
  $("task").replaceChildren(...tasks.map((task) => {
    const option = new Option(task, task);
    option.selected = task === chosen;
    return option;
  }));
  onTask();
}

function needsText() { return TEXT_TASKS.has($("task").value); }
function needsRegion() { return $("task").value.startsWith("REGION_TO_"); }

function onTask() {
  $("text-row").hidden = !needsText();
  $("region-row").hidden = !needsRegion();
  update();
}

function update() {
  const ready = state.file && $("model").value && $("task").value && (!needsRegion() || state.region)
    && (!needsText() || $("text").value.trim());
  $("run").disabled = !ready || state.running;
  $("region").textContent = state.region ? state.region.map(Math.round).join(", ") : "draw it on the image";
  snippets();
}

// -- the image and the region ----------------------------------------------------------------------

function useFile(file) {
  if (!file) return;
  state.file = file;
  state.region = null;
  state.result = null;
  const image = new Image();
  image.onload = () => {
    state.image = image;
    $("canvas").width = image.naturalWidth;
    $("canvas").height = image.naturalHeight;
    draw();
    update();
  };
  image.onerror = () => say(`${file.name} is not an image this browser can show`, true);
  image.src = URL.createObjectURL(file);
}

function imagePoint(event) {
  const canvas = $("canvas");
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * (canvas.width / box.width),
    (event.clientY - box.top) * (canvas.height / box.height)];
}

function startRegion(event) {
  if (!state.image || !needsRegion()) return;
  state.drag = imagePoint(event);
}

function moveRegion(event) {
  if (!state.drag) return;
  const [x, y] = imagePoint(event);
  const [x0, y0] = state.drag;
  state.region = [Math.min(x0, x), Math.min(y0, y), Math.max(x0, x), Math.max(y0, y)];
  draw();
}

function endRegion(event) {
  if (!state.drag) return;
  moveRegion(event);
  state.drag = null;
  const [x1, y1, x2, y2] = state.region;
  if (x2 - x1 < 2 || y2 - y1 < 2) state.region = null;
  draw();
  update();
}

// -- drawing ------------------------------------------------------------------------------------------

function label(context, text, x, y, color) {
  context.font = "bold 16px sans-serif";
  const width = context.measureText(text).width + 8;
  context.fillStyle = color;
  context.fillRect(x, Math.max(0, y - 20), width, 20);
  context.fillStyle = "#fff";
  context.fillText(text, x + 4, Math.max(15, y - 5));
}

function path(context, points) {
  context.beginPath();
  for (let i = 0; i < points.length; i += 2) context[i ? "lineTo" : "moveTo"](points[i], points[i + 1]);
  context.closePath();
}

function draw() {
  const context = $("canvas").getContext("2d");
  if (!state.image) return;
  context.drawImage(state.image, 0, 0);
  context.lineWidth = Math.max(2, state.image.naturalWidth / 300);
  const result = state.result;
  const labels = [];
  if (result) {
    (result.boxes || []).forEach((box, i) => {
      const color = COLORS[i % COLORS.length];
      context.strokeStyle = color;
      context.strokeRect(box.x1, box.y1, box.x2 - box.x1, box.y2 - box.y1);
      const text = box.score === undefined ? box.label : `${box.label} ${box.score.toFixed(2)}`;
      if (text) label(context, text, box.x1, box.y1, color);
      labels.push(box.label);
    });
    (result.polygons || []).forEach((polygon, i) => {
      const color = COLORS[i % COLORS.length];
      context.strokeStyle = color;
      context.fillStyle = `${color}55`;
      for (const ring of polygon.rings || []) {
        path(context, ring.points);
        context.fill();
        context.stroke();
      }
      const first = (polygon.rings || [])[0];
      if (first && polygon.label) label(context, polygon.label, first.points[0], first.points[1], color);
      labels.push(polygon.label);
    });
    (result.ocr || []).forEach((quad, i) => {
      const color = COLORS[i % COLORS.length];
      context.strokeStyle = color;
      path(context, quad.points);
      context.stroke();
      label(context, quad.text, quad.points[0], quad.points[1], color);
      labels.push(quad.text);
    });
  }
  if (state.region) {
    const [x1, y1, x2, y2] = state.region;
    context.setLineDash([8, 6]);
    context.strokeStyle = "#ffeb3b";
    context.strokeRect(x1, y1, x2 - x1, y2 - y1);
    context.setLineDash([]);
  }
  $("caption").textContent = result ? (result.text || labels.filter(Boolean).join(", ")) : "";
  $("caption").dataset.labels = JSON.stringify(labels);
}

// -- running a job ------------------------------------------------------------------------------------

function formFields() {
  const fields = [["model", $("model").value], ["task", $("task").value]];
  if (needsText()) fields.push(["text", $("text").value.trim()]);
  if (needsRegion() && state.region) fields.push(["region", state.region.map(Math.round).join(",")]);
  if ($("beams").value) fields.push(["num_beams", $("beams").value]);
  if ($("max-tokens").value) fields.push(["max_new_tokens", $("max-tokens").value]);
  return fields;
}

function showEvent(event) {
  const item = document.createElement("li");
  const error = event.error ? ` ${event.error.reason}: ${event.error.message}` : "";
  item.textContent = `${short(event.type)} ${short(event.state)} ${event.eventId}${error}`;
  item.dataset.type = short(event.type);
  $("events").append(item);
  if (event.result && (event.type === "EVENT_TYPE_RESULT" || event.type === "EVENT_TYPE_DONE")) {
    state.result = event.result;
    $("json").textContent = JSON.stringify(event.result, null, 2);
    $("copy").disabled = false;
    draw();
  }
  if (event.error) say(`${short(event.type)}: ${event.error.reason}: ${event.error.message}`, true);
  else if (event.type === "EVENT_TYPE_DONE") say(`done: ${event.result.generatedTokens} tokens`);
}

async function readEvents(response) {
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
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      if (!data.length) continue; // a keep-alive comment
      const message = JSON.parse(data.join("\n"));
      if (name === "error") say(errorText(message), true);
      else showEvent(message.event);
    }
  }
}

async function run() {
  state.running = true;
  state.result = null;
  $("events").replaceChildren();
  $("json").textContent = "";
  $("copy").disabled = true;
  draw();
  update();
  say("running…");
  try {
    const form = new FormData();
    form.append("image", state.file, state.file.name);
    for (const [name, value] of formFields()) form.append(name, value);
    const response = await fetch("/v1/jobs:run", { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) say(errorText(await readJson(response)), true);
    else await readEvents(response);
  } catch (error) {
    say(`the connection failed: ${error.message}`, true);
  } finally {
    state.running = false;
    update();
  }
}

// -- what the same request looks like elsewhere -----------------------------------------------------

function quoted(text) {
  return /^[\w.,:/@=-]+$/.test(text) ? text : `'${text.replace(/'/g, "'\\''")}'`;
}

function snippets() {
  const name = state.file ? state.file.name : "image.jpg";
  const token = $("token").value.trim() ? ` -H "Authorization: Bearer $FLORENCE2_TOKEN"` : "";
  const fields = formFields().map(([key, value]) => ` -F ${quoted(`${key}=${value}`)}`).join("");
  $("curl").textContent = `curl -N${token} -F ${quoted(`image=@${name}`)}${fields} ${location.origin}/v1/jobs:run`;
  const options = [];
  if (needsText()) options.push(`text=${JSON.stringify($("text").value.trim())}`);
  if (needsRegion() && state.region) options.push(`region=(${state.region.map(Math.round).join(", ")})`);
  if ($("beams").value) options.push(`num_beams=${Number($("beams").value)}`);
  if ($("max-tokens").value) options.push(`max_new_tokens=${Number($("max-tokens").value)}`);
  const extra = options.map((option) => `, ${option}`).join("");
  $("python").textContent = [
    "from florence2_serve.client import Florence2Client",
    "",
    `# the front end's gRPC address (florence2 up prints it)${token ? "; token=... when it has --token" : ""}`,
    `with Florence2Client("${location.hostname}:50051") as client:`,
    `    result = client.detect(${JSON.stringify(name)}, ${JSON.stringify($("model").value)}, ` +
      `${JSON.stringify($("task").value)}${extra})`,
    "print(result)",
  ].join("\n");
}

async function copyJson() {
  const text = $("json").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  say("result JSON copied");
}

// -- wiring -------------------------------------------------------------------------------------------

$("token").value = sessionStorage.getItem("florence2-token") || "";
$("token").addEventListener("change", () => {
  sessionStorage.setItem("florence2-token", $("token").value.trim());
  loadModels();
});
$("model").addEventListener("change", onModel);
$("task").addEventListener("change", onTask);
$("text").addEventListener("input", update);
$("beams").addEventListener("input", update);
$("max-tokens").addEventListener("input", update);
$("file").addEventListener("change", () => useFile($("file").files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  useFile(event.dataTransfer.files[0]);
});
$("canvas").addEventListener("mousedown", startRegion);
$("canvas").addEventListener("mousemove", moveRegion);
window.addEventListener("mouseup", endRegion);
$("run").addEventListener("click", run);
$("copy").addEventListener("click", copyJson);
loadModels();
