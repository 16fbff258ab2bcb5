// The demo page: one panel per model of the repository, built from GET /v1/models. Each panel sends
// its input to the model's task endpoint (the answer and its Server-Timing) and then to
// /v1/explain/{model} (why). Plain DOM code, no framework: nothing to build or fetch from elsewhere.
"use strict";

const EXAMPLE_REVIEWS = [
  "A gripping, beautifully acted film that stays with you long after the credits.",
  "Dull, overlong and badly written; I nearly walked out.",
  "The cast is wonderful, but the plot falls apart in the second half.",
];
// MNIST's own preparation: the drawing's bounding box scaled to fit 20 of 28 pixels, then placed so
// that its centre of mass is the frame's centre.
const FIT_SHARE = 20 / 28;

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) el.append(child);
  }
  return el;
}

function percent(p) {
  return `${(p * 100).toFixed(p >= 0.995 || p < 0.001 ? 1 : 2)} %`;
}

// "queue;dur=0.1, compute;dur=1.2, batch;desc="4", total;dur=3" → {queue: 0.1, compute: 1.2, ...}
function parseServerTiming(header) {
  const out = {};
  for (const part of (header || "").split(",")) {
    const [name, ...params] = part.trim().split(";");
    if (!name) continue;
    for (const param of params) {
      const [key, raw] = param.split("=");
      const value = (raw || "").replace(/"/g, "");
      if (key.trim() === "dur") out[name] = Number(value);
      if (key.trim() === "desc") out[name] = value;
    }
  }
  return out;
}

function describeTiming(t, prefix) {
  const parts = [];
  if (t.queue !== undefined) parts.push(`queue ${t.queue.toFixed(2)} ms`);
  if (t.compute !== undefined) parts.push(`compute ${t.compute.toFixed(2)} ms`);
  if (t.batch !== undefined) parts.push(`batch ${t.batch}`);
  if (t.total !== undefined) parts.push(`total ${t.total.toFixed(2)} ms`);
  return `${prefix}: ${parts.join(" · ")}`;
}

class RequestError extends Error {}

async function call(url, init) {
  let response;
  try {
    response = await fetch(url, init);
  } catch (e) {
    throw new RequestError(`the server could not be reached (${e.message})`);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? `${body.error} (${body.code})` : `HTTP ${response.status}`;
    throw new RequestError(message);
  }
  return { body, timing: parseServerTiming(response.headers.get("server-timing")) };
}

function bars(predictions) {
  return h("ol", { class: "bars", "aria-label": "Top answers" }, predictions.map((p) =>
    h("li", {},
      h("span", { class: "label", text: p.label }),
      h("span", { class: "track", "aria-hidden": "true" },
        h("span", { class: "fill", style: `width: ${(p.probability * 100).toFixed(1)}%; display: block` })),
      h("span", { class: "value", text: percent(p.probability) }))));
}

function tint(importance, peak) {
  const v = peak > 0 ? importance / peak : 0;
  const colour = v >= 0 ? "var(--support)" : "var(--oppose)";
  return `background: rgba(${colour}, ${(Math.abs(v) * 0.6).toFixed(3)})`;
}

function legend(target) {
  return h("p", { class: "legend" },
    h("span", { class: "sup", text: "Red" }), ` supports “${target.label}” (${percent(target.probability)}); `,
    h("span", { class: "opp", text: "blue" }), " argues against it. ");
}

// A panel: input controls (per task), then the answer, the timing, the explanation and the card.
class Panel {
  constructor(model) {
    this.model = model;
    this.id = `m-${model.name.replace(/[^a-zA-Z0-9_-]/g, "_")}`;
    this.answer = h("div", { class: "answer", "aria-live": "polite" });
    this.why = h("div", { class: "explanation", "aria-live": "polite" });
    this.busy = false;
  }

  render() {
    const m = this.model;
    const card = m.card ? this.cardSection() : null;
    const title = h("h2", { id: `${this.id}-title` }, m.name,
      h("span", { class: "badge", text: m.task }),
      m.version ? h("span", { class: "meta", text: `version ${m.version}` }) : null);
    const section = h("section", { class: "panel", id: this.id, "aria-labelledby": `${this.id}-title` },
      title, h("p", { class: "meta", text: m.description }));
    if (m.state !== "READY") {
      section.append(h("p", { class: "error", text: `Not serving: ${m.state}` }));
      return section;
    }
    section.append(this.inputs(), h("div", { class: "result" }, this.answer, this.why), card);
    return section;
  }

  cardSection() {
    const body = h("div", { class: "card-body" }, h("p", { text: "Loading…" }));
    const details = h("details", { class: "card" }, h("summary", { text: "Model card" }), body);
    let loaded = false;
    details.addEventListener("toggle", async () => {
      if (!details.open || loaded) return;
      loaded = true;
      try {
        const response = await fetch(`v1/models/${encodeURIComponent(this.model.name)}/card`);
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        // Rendered by the server from the model's README.md, with raw HTML disabled.
        body.innerHTML = await response.text();
      } catch (e) {
        body.replaceChildren(h("p", { class: "error", text: `The card could not be loaded: ${e.message}` }));
      }
    });
    return details;
  }

  url(kind) {
    return `v1/${kind}/${encodeURIComponent(this.model.name)}?top_k=5&version=${encodeURIComponent(this.model.version)}`;
  }

  // Ask the task endpoint, then the explanation endpoint, for the same body.
  async ask(makeInit) {
    if (this.busy) return;
    this.busy = true;
    this.answer.replaceChildren(h("p", { class: "meta", text: "Asking the model…" }));
    this.why.replaceChildren();
    try {
      const task = { image: "image", text: "text", speech: "audio" }[this.model.task];
      const predicted = await call(this.url(task), makeInit());
      const top = predicted.body.predictions[0];
      this.answer.replaceChildren(
        h("h3", { text: "Answer" }), bars(top),
        h("p", { class: "timing", text: describeTiming(predicted.timing, "Server-Timing") }));
      this.answer.dataset.top = top[0].label;
      this.why.replaceChildren(h("p", { class: "meta", text: "Explaining…" }));
      const explained = await call(this.url("explain"), makeInit());
      const e = explained.body.explanations[0];
      this.why.replaceChildren(h("h3", { text: "Why" }), ...this.explanation(e),
        h("p", { class: "timing", text: `${describeTiming(explained.timing, "Explanation")} · ` +
          `${e.rows} rows (the input and ${e.rows - 1} occluded copies) in ${e.batches} batched call${e.batches === 1 ? "" : "s"}` }));
      this.why.dataset.ready = "true";
    } catch (e) {
      if (!(e instanceof RequestError)) throw e;
      const target = this.answer.dataset.top ? this.why : this.answer;
      target.replaceChildren(h("p", { class: "error", role: "alert", text: `Error: ${e.message}` }));
    } finally {
      this.busy = false;
    }
  }
}

class ImagePanel extends Panel {
  inputs() {
    const { width, height } = this.model.input;
    this.width = width;
    this.height = height;
    this.draw = h("canvas", {
      class: "draw", width: 280, height: 280, tabindex: 0, role: "img",
      "aria-label": `Drawing area for ${this.model.name}. With the keyboard: arrow keys move the pen, ` +
        "Space lowers or lifts it, Enter asks the model, Delete clears.",
    });
    this.pen = h("div", { class: "pen", "aria-hidden": "true" });
    this.sent = h("canvas", { class: "sent", width, height, role: "img", "aria-label": "What the model receives" });
    const file = h("input", { type: "file", accept: "image/*", "aria-label": `Upload a picture for ${this.model.name}` });
    file.addEventListener("change", () => file.files[0] && this.sendFile(file.files[0]));
    const drop = h("div", { class: "drop" }, h("label", { class: "file" }, "Or upload a picture ", file),
      h("p", { class: "meta", text: "… or drop one here." }));
    this.acceptDrops(drop, (f) => this.sendFile(f));
    this.setUpDrawing();
    return h("div", { class: "inputs" },
      h("div", {},
        h("div", { class: "drawing" }, this.draw, this.pen),
        h("div", { class: "buttons" },
          h("button", { type: "button", class: "primary", text: "Ask", onclick: () => this.sendDrawing() }),
          h("button", { type: "button", text: "Clear", onclick: () => this.clear() }))),
      h("figure", {}, this.sent,
        h("figcaption", { text: `Sent to the model: ${width}×${height}, white on black, the drawing ` +
          "scaled into the centre by its centre of mass (as MNIST was prepared)." })),
      drop);
  }

  acceptDrops(zone, onFile) {
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      if (e.dataTransfer.files[0]) onFile(e.dataTransfer.files[0]);
    });
  }

  setUpDrawing() {
    const ctx = this.draw.getContext("2d");
    this.ctx = ctx;
    this.clear();
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.strokeStyle = "#fff";
    // A stroke as thick as MNIST's pens: about 2.2 of 28 pixels.
    ctx.lineWidth = (280 / 28) * 2.2;
    let last = null;
    const point = (e) => {
      const r = this.draw.getBoundingClientRect();
      return [(e.clientX - r.left) * (280 / r.width), (e.clientY - r.top) * (280 / r.height)];
    };
    this.draw.addEventListener("pointerdown", (e) => {
      e.preventDefault();
      this.draw.setPointerCapture(e.pointerId);
      last = point(e);
      this.line(last, last);
    });
    this.draw.addEventListener("pointermove", (e) => {
      if (!last) return;
      const p = point(e);
      this.line(last, p);
      last = p;
    });
    const end = () => {
      if (!last) return;
      last = null;
      this.sendDrawing();
    };
    this.draw.addEventListener("pointerup", end);
    this.draw.addEventListener("pointercancel", end);
    // Keyboard drawing: a pen cursor moved with the arrow keys.
    this.cursor = [140, 140];
    this.penDown = false;
    this.movePen();
    this.draw.addEventListener("keydown", (e) => this.key(e));
  }

  key(e) {
    const step = e.shiftKey ? 4 : 14;
    const moves = { ArrowUp: [0, -step], ArrowDown: [0, step], ArrowLeft: [-step, 0], ArrowRight: [step, 0] };
    if (moves[e.key]) {
      e.preventDefault();
      const from = this.cursor;
      const to = [Math.min(279, Math.max(0, from[0] + moves[e.key][0])),
        Math.min(279, Math.max(0, from[1] + moves[e.key][1]))];
      if (this.penDown) this.line(from, to);
      this.cursor = to;
      this.movePen();
    } else if (e.key === " ") {
      e.preventDefault();
      this.penDown = !this.penDown;
      if (this.penDown) this.line(this.cursor, this.cursor);
      this.movePen();
    } else if (e.key === "Enter") {
      e.preventDefault();
      this.sendDrawing();
    } else if (e.key === "Delete" || e.key === "Backspace") {
      e.preventDefault();
      this.clear();
    }
  }

  movePen() {
    this.pen.style.left = `${(this.cursor[0] / 280) * 100}%`;
    this.pen.style.top = `${(this.cursor[1] / 280) * 100}%`;
    this.pen.classList.toggle("down", this.penDown);
  }

  line(a, b) {
    this.ctx.beginPath();
    this.ctx.moveTo(a[0], a[1]);
    this.ctx.lineTo(b[0], b[1]);
    this.ctx.stroke();
    this.dirty = true;
  }

  clear() {
    this.ctx.fillStyle = "#000";
    this.ctx.fillRect(0, 0, 280, 280);
    this.dirty = false;
    if (this.sent) this.sent.getContext("2d").clearRect(0, 0, this.width, this.height);
  }

  // The drawing as the model's input: cropped, scaled, centred by mass; drawn in this.sent.
  prepare() {
    const { width: W, height: H } = this;
    const pixels = this.ctx.getImageData(0, 0, 280, 280).data;
    let x0 = 280, y0 = 280, x1 = -1, y1 = -1;
    for (let y = 0; y < 280; y++) {
      for (let x = 0; x < 280; x++) {
        if (pixels[(y * 280 + x) * 4] > 32) {
          x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
        }
      }
    }
    if (x1 < 0) return false;
    const bw = x1 - x0 + 1, bh = y1 - y0 + 1;
    const scale = Math.min((W * FIT_SHARE) / bw, (H * FIT_SHARE) / bh);
    const sw = Math.max(1, Math.round(bw * scale)), sh = Math.max(1, Math.round(bh * scale));
    // Halve the size step by step: one big bilinear step would skip most of the stroke.
    let source = this.draw, sx = x0, sy = y0, cw = bw, ch = bh;
    while (cw / 2 > sw && ch / 2 > sh) {
      const half = h("canvas", { width: Math.ceil(cw / 2), height: Math.ceil(ch / 2) });
      const hc = half.getContext("2d");
      hc.imageSmoothingQuality = "high";
      hc.drawImage(source, sx, sy, cw, ch, 0, 0, half.width, half.height);
      source = half; sx = 0; sy = 0; cw = half.width; ch = half.height;
    }
    const small = h("canvas", { width: sw, height: sh });
    const sc = small.getContext("2d", { willReadFrequently: true });
    sc.imageSmoothingQuality = "high";
    sc.drawImage(source, sx, sy, cw, ch, 0, 0, sw, sh);
    const data = sc.getImageData(0, 0, sw, sh).data;
    let mass = 0, mx = 0, my = 0;
    for (let y = 0; y < sh; y++) {
      for (let x = 0; x < sw; x++) {
        const v = data[(y * sw + x) * 4];
        mass += v; mx += v * (x + 0.5); my += v * (y + 0.5);
      }
    }
    const cx = mass ? mx / mass : sw / 2, cy = mass ? my / mass : sh / 2;
    const left = Math.round(Math.min(W - sw, Math.max(0, W / 2 - cx)));
    const top = Math.round(Math.min(H - sh, Math.max(0, H / 2 - cy)));
    const out = this.sent.getContext("2d");
    out.fillStyle = "#000";
    out.fillRect(0, 0, W, H);
    out.drawImage(small, left, top);
    return true;
  }

  sendDrawing() {
    if (!this.dirty || !this.prepare()) return;
    this.sent.toBlob((blob) => {
      this.ask(() => ({ method: "POST", body: blob, headers: { "Content-Type": "image/png" } }));
    }, "image/png");
  }

  sendFile(file) {
    this.sent.getContext("2d").clearRect(0, 0, this.width, this.height);
    this.ask(() => ({ method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" } }));
  }

  explanation(e) {
    // What the model saw (after the server's own preparation), with the heatmap over it.
    const saw = new Image();
    saw.onload = () => {
      const c = this.sent.getContext("2d");
      c.imageSmoothingEnabled = false;
      c.drawImage(saw, 0, 0, this.width, this.height);
    };
    saw.src = `data:image/png;base64,${e.input_png}`;
    return [
      legend(e.target),
      h("div", { class: "stack" },
        h("img", { src: `data:image/png;base64,${e.input_png}`, alt: "The input the model saw" }),
        h("img", { class: "overlay heatmap", src: `data:image/png;base64,${e.heatmap_png}`,
          alt: `Occlusion heatmap for ${e.target.label}` })),
      h("p", { class: "meta", text: `A ${e.patch}×${e.patch} black square slid over the input ` +
        `every ${e.stride} pixels; each pixel shows how much hiding it lowered the probability.` }),
    ];
  }
}

class TextPanel extends Panel {
  inputs() {
    const id = `${this.id}-text`;
    this.box = h("textarea", { id, rows: 4, placeholder: "Type a review…" });
    this.box.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); this.send(); }
    });
    return h("div", { class: "inputs", style: "display: block" },
      h("label", { for: id, text: "A review (Ctrl+Enter sends)" }), this.box,
      h("div", { class: "examples", role: "group", "aria-label": "Example reviews" },
        EXAMPLE_REVIEWS.map((text, i) => h("button", {
          type: "button", text: `Example ${i + 1}`, title: text,
          onclick: () => { this.box.value = text; this.send(); },
        }))),
      h("div", { class: "buttons" },
        h("button", { type: "button", class: "primary", text: "Classify", onclick: () => this.send() })));
  }

  send() {
    const text = this.box.value.trim();
    if (!text) return;
    this.ask(() => ({ method: "POST", body: JSON.stringify({ text }), headers: { "Content-Type": "application/json" } }));
  }

  explanation(e) {
    const peak = Math.max(0, ...e.spans.map((s) => Math.abs(s.importance || 0)));
    const words = [];
    let at = 0;
    for (const s of e.spans) {
      words.push(e.text.slice(at, s.start));
      words.push(s.importance === null
        ? h("span", { title: "past the model's token limit: not read", text: s.text })
        : h("mark", { style: tint(s.importance, peak), title: `${s.importance >= 0 ? "+" : ""}${(s.importance * 100).toFixed(2)} points`, text: s.text }));
      at = s.end;
    }
    words.push(e.text.slice(at));
    return [legend(e.target), h("p", { class: "why" }, words),
      h("p", { class: "meta", text: "Each word was masked out in turn; the colour shows how much that lowered the probability." })];
  }
}

class AudioPanel extends Panel {
  inputs() {
    const { duration_s: seconds } = this.model.input;
    this.seconds = seconds;
    this.player = h("audio", { controls: true, hidden: true });
    const file = h("input", { type: "file", accept: "audio/*", "aria-label": `Upload a clip for ${this.model.name}` });
    file.addEventListener("change", () => file.files[0] && this.sendClip(file.files[0]));
    this.record = h("button", { type: "button", class: "primary", text: `Record ${seconds + 0.5} s`,
      onclick: () => this.recordClip() });
    const drop = h("div", { class: "drop" }, h("label", { class: "file" }, "Or upload a clip (WAV, FLAC, OGG) ", file));
    ImagePanel.prototype.acceptDrops.call(this, drop, (f) => this.sendClip(f));
    return h("div", { class: "inputs", style: "display: block" },
      h("div", { class: "buttons" }, this.record), drop, this.player,
      h("p", { class: "meta", text: `The model hears ${seconds} s at ${this.model.input.sample_rate} Hz: ` +
        "a longer clip is cut to its loudest part, a shorter one padded with silence." }));
  }

  async recordClip() {
    if (!navigator.mediaDevices || !window.MediaRecorder) {
      this.answer.replaceChildren(h("p", { class: "error", role: "alert", text: "This browser cannot record audio here (it needs a secure context: https or localhost)." }));
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      this.answer.replaceChildren(h("p", { class: "error", role: "alert", text: `No microphone: ${e.message}` }));
      return;
    }
    const chunks = [];
    const recorder = new MediaRecorder(stream);
    recorder.addEventListener("dataavailable", (e) => chunks.push(e.data));
    const stopped = new Promise((resolve) => recorder.addEventListener("stop", resolve));
    this.record.disabled = true;
    this.record.textContent = "Recording…";
    recorder.start();
    await new Promise((resolve) => setTimeout(resolve, (this.seconds + 0.5) * 1000));
    recorder.stop();
    await stopped;
    stream.getTracks().forEach((t) => t.stop());
    this.record.disabled = false;
    this.record.textContent = `Record ${this.seconds + 0.5} s`;
    // The recorder's own format (WebM/Opus in Chromium) is not one the service decodes: the browser
    // decodes it and the page sends 16-bit PCM WAV.
    const recorded = new Blob(chunks, { type: recorder.mimeType });
    const context = new AudioContext();
    try {
      const decoded = await context.decodeAudioData(await recorded.arrayBuffer());
      this.sendClip(new Blob([wav(decoded)], { type: "audio/wav" }));
    } catch (e) {
      this.answer.replaceChildren(h("p", { class: "error", role: "alert", text: `The recording could not be decoded: ${e.message}` }));
    } finally {
      context.close();
    }
  }

  sendClip(blob) {
    this.player.src = URL.createObjectURL(blob);
    this.player.hidden = false;
    this.ask(() => ({ method: "POST", body: blob, headers: { "Content-Type": blob.type || "application/octet-stream" } }));
  }

  explanation(e) {
    const last = e.segments[e.segments.length - 1];
    const strongest = e.segments.reduce((a, b) => (b.importance > a.importance ? b : a));
    return [legend(e.target),
      h("img", { class: "spectrogram", src: `data:image/png;base64,${e.spectrogram_png}`,
        alt: `Spectrogram with the importance of each moment for ${e.target.label}; the strongest ` +
          `is ${strongest.start_s.toFixed(2)}–${strongest.end_s.toFixed(2)} s` }),
      h("p", { class: "meta", text: `Spectrogram of the ${last.end_s.toFixed(2)} s the model heard ` +
        "(time →, pitch ↑); each moment was silenced in turn and tinted by how much that lowered the probability." })];
  }
}

// AudioBuffer → mono 16-bit PCM WAV bytes at the buffer's own rate (the service resamples).
function wav(buffer) {
  const n = buffer.length, rate = buffer.sampleRate;
  const mono = new Float32Array(n);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const data = buffer.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += data[i] / buffer.numberOfChannels;
  }
  const out = new DataView(new ArrayBuffer(44 + n * 2));
  const text = (at, s) => { for (let i = 0; i < s.length; i++) out.setUint8(at + i, s.charCodeAt(i)); };
  text(0, "RIFF"); out.setUint32(4, 36 + n * 2, true); text(8, "WAVE");
  text(12, "fmt "); out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
  out.setUint32(24, rate, true); out.setUint32(28, rate * 2, true); out.setUint16(32, 2, true);
  out.setUint16(34, 16, true); text(36, "data"); out.setUint32(40, n * 2, true);
  for (let i = 0; i < n; i++) out.setInt16(44 + i * 2, Math.round(Math.max(-1, Math.min(1, mono[i])) * 32767), true);
  return out.buffer;
}

const PANELS = { image: ImagePanel, text: TextPanel, speech: AudioPanel };

async function main() {
  const main = document.getElementById("models");
  const status = document.getElementById("status");
  let models;
  try {
    // A server just started loads its models one by one: wait for them (a minute at most).
    for (let tries = 0; ; tries++) {
      models = (await call("v1/models")).body;
      if (!models.some((m) => m.state === "LOADING") || tries >= 60) break;
      status.textContent = "The models are loading…";
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  } catch (e) {
    status.textContent = `The models could not be listed: ${e.message}`;
    status.className = "error";
    return;
  }
  const panels = models.filter((m) => PANELS[m.task]).map((m) => new PANELS[m.task](m));
  status.textContent = panels.length ? `${panels.length} model${panels.length === 1 ? "" : "s"}` : "No models in the repository.";
  status.className = "meta";
  for (const panel of panels) main.append(panel.render());
  document.body.dataset.ready = "true";
}

main();
