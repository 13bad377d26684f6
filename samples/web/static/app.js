// The page's whole logic: post the form, poll the job for progress, show the image, keep a strip of recent ones;
// for a bundle with a ControlNet, a canvas to draw the control image on. Plain browser JavaScript: no framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 150;        // how often to ask for progress while a generation runs
const GIVE_UP_MS = 600000;  // a generation that reports nothing for this long is shown as an error
let drawn = false;          // has anything been drawn since the canvas was cleared (an empty one is not sent)

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let data = {};
  try { data = await response.json(); } catch { /* a body that is not JSON: report the status below */ }
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function showError(message) {
  $("error").textContent = message ? `Error: ${message}` : "";
}

function showImage(url, settings) {
  const img = $("result");
  img.src = url;
  img.hidden = false;
  const s = settings || {};
  $("caption").textContent = [s.prompt, s.seed !== undefined && `seed ${s.seed}`, s.steps && `${s.steps} steps`,
    s.guidance_scale && `guidance ${s.guidance_scale}`, s.sampler].filter(Boolean).join(" · ");
}

async function loadInfo() {
  const info = await getJSON("/api/info");
  $("bundle").textContent = `${info.bundle} (${info.model}, ${info.width}x${info.height})`;
  for (const name of info.samplers) {
    const option = new Option(name === info.default_sampler ? `${name} (model's own)` : name, name);
    $("sampler").add(option);
  }
  $("steps").value = info.defaults.steps;
  $("steps").max = info.limits.steps;
  $("guidance").value = info.defaults.guidance;
  $("guidance").max = info.limits.guidance;
  if (info.controlnets > 0) setUpDrawing(info.width, info.height);
}

function clearDrawing() {
  const canvas = $("canvas");
  const context = canvas.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, canvas.width, canvas.height);
  drawn = false;
}

// The canvas has the bundle's size (the control image's) and is shown larger: pointer positions are scaled to it.
function setUpDrawing(width, height) {
  const canvas = $("canvas");
  const context = canvas.getContext("2d");
  canvas.width = width;
  canvas.height = height;
  clearDrawing();
  let last = null;
  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * width / box.width, (event.clientY - box.top) * height / box.height];
  };
  const stroke = (from, to) => {
    context.strokeStyle = "#fff";
    context.lineWidth = Math.max(2, Math.round(width / 10));
    context.lineCap = context.lineJoin = "round";
    context.beginPath();
    context.moveTo(...from);
    context.lineTo(...to);
    context.stroke();
    drawn = true;
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = at(event);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const point = at(event);
    stroke(last, point);
    last = point;
  });
  for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { last = null; });
  $("clear").addEventListener("click", clearDrawing);
  $("control").hidden = false;
}

async function loadRecent() {
  const strip = $("recent");
  strip.replaceChildren();
  for (const item of await getJSON("/api/recent")) {
    const thumb = new Image();
    thumb.src = item.url;
    thumb.alt = thumb.title = `${item.prompt} (seed ${item.seed})`;
    // Clicking a thumbnail shows it and puts its settings back into the form, to vary them.
    thumb.addEventListener("click", () => {
      showImage(item.url, item);
      $("prompt").value = item.prompt;
      $("negative_prompt").value = item.negative_prompt;
      $("seed").value = item.seed;
      $("steps").value = item.steps;
      $("guidance").value = item.guidance_scale;
    });
    strip.append(thumb);
  }
}

function setProgress(step, total) {
  $("progress").max = total || 1;
  $("progress").value = step;
  $("step").textContent = total ? `step ${step}/${total}` : "";
}

async function generate(event) {
  event.preventDefault();
  showError("");
  document.body.dataset.state = "running";  // running | done | error: for scripts that drive the page
  $("generate").disabled = true;
  setProgress(0, 0);
  $("step").textContent = "starting…";
  try {
    const settings = {
      prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, seed: $("seed").value,
      steps: $("steps").value, guidance: $("guidance").value, sampler: $("sampler").value,
    };
    if (drawn) settings.control_image = $("canvas").toDataURL("image/png");
    const started = await getJSON("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(settings),
    });
    const job = await follow(started.job);
    showImage(job.image, job.settings);
    await $("result").decode();  // the new image is on screen before the page says done
    document.body.dataset.state = "done";
    await loadRecent();
  } catch (error) {
    document.body.dataset.state = "error";
    showError(error.message);
    $("step").textContent = "";
  } finally {
    $("generate").disabled = false;
  }
}

// Poll the job until it is done (returns it) or failed (throws its message).
async function follow(id) {
  let lastChange = Date.now(), lastStep = -1;
  for (;;) {
    const job = await getJSON(`/api/jobs/${id}`);
    setProgress(job.step, job.total);
    if (job.state === "running" && job.preview) showImage(job.preview, {});  // the image forming, step by step
    if (job.state === "done") return job;
    if (job.state === "error") throw new Error(job.error);
    if (job.step !== lastStep) { lastStep = job.step; lastChange = Date.now(); }
    if (Date.now() - lastChange > GIVE_UP_MS) throw new Error("the server reports no progress");
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  loadInfo().then(loadRecent).catch((error) => showError(`cannot reach the server: ${error.message}`));
});
