// The playground: one streaming chat request per chosen compressor, through the same HTTP API
// any client calls (with Squint's return_coverage), and each visual token's patches drawn over
// the picture. Plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const Playground = (() => {
  // Kept patches (a token that is one patch) share one colour; each merged token gets the next
  // colour of the palette; patches no token covers are dimmed.
  const KEPT = [0, 200, 83];
  const MERGED = [
    [230, 25, 75], [67, 99, 216], [245, 130, 49], [145, 30, 180], [66, 212, 244], [240, 50, 230],
    [191, 239, 69], [250, 190, 212], [70, 153, 144], [220, 190, 255], [154, 99, 36], [255, 250, 200],
  ];
  const FILL_ALPHA = 0.45;
  const DROPPED = "rgba(0, 0, 0, 0.6)";

  const state = { model: "", file: null, kind: "", image: null, video: null };
  const $ = (id) => document.getElementById(id);

  function headers() {
    const h = { "content-type": "application/json" };
    const token = $("token").value.trim();
    if (token) h.authorization = `Bearer ${token}`;
    return h;
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
    } catch (_) { /* not JSON: the status says enough */ }
    return `${response.status}: ${response.statusText || "request failed"}`;
  }

  function showFormError(text) {
    const p = $("form-error");
    p.textContent = text;
    p.hidden = !text;
  }

  // ------------------------------------------------------------------ what the server offers

  async function loadModel() {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    state.model = body.data[0].id;
    $("model").textContent = state.model;
  }

  async function loadCompressors() {
    const list = $("compressor-list");
    const response = await fetch("/v1/squint/compressors", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    list.replaceChildren();
    const names = ["none", ...body.data.map((c) => c.name).filter((n) => n !== "none")];
    const summaries = Object.fromEntries(body.data.map((c) => [c.name, c.summary]));
    for (const name of names) {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.name = "compressor";
      box.value = name;
      box.id = `compressor-${name}`;
      label.htmlFor = box.id;
      label.title = summaries[name] || "every patch, uncompressed";
      label.append(box, ` ${name}`);
      list.append(label);
    }
  }

  async function loadServer() {
    try {
      await loadModel();
      await loadCompressors();
      showFormError("");
    } catch (error) {
      showFormError(error.message);
    }
  }

  async function loadExamples() {
    const response = await fetch("/playground/examples");
    if (!response.ok) return;
    const names = (await response.json()).data;
    if (!names.length) return;
    const list = $("example-list");
    for (const name of names) {
      const button = document.createElement("button");
      button.type = "button";
      button.setAttribute("aria-pressed", "false");
      button.setAttribute("aria-label", `example ${name}`);
      if (!/\.(mp4|webm|mov)$/i.test(name)) {
        const img = document.createElement("img");
        img.src = `/playground/examples/${encodeURIComponent(name)}`;
        img.alt = "";
        button.append(img);
      } else {
        button.textContent = name;
      }
      button.addEventListener("click", async () => {
        const blob = await (await fetch(`/playground/examples/${encodeURIComponent(name)}`)).blob();
        for (const b of list.querySelectorAll("button")) b.setAttribute("aria-pressed", String(b === button));
        await choose(new File([blob], name, { type: blob.type }));
      });
      list.append(button);
    }
    $("examples").hidden = false;
  }

  // ------------------------------------------------------------------ the chosen picture

  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the file is not an image this browser can show"));
      img.src = url;
    });
  }

  async function choose(file) {
    state.file = file;
    state.kind = file.type.startsWith("video/") ? "video" : "image";
    state.image = null;
    state.video = null;
    const url = URL.createObjectURL(file);
    if (state.kind === "image") {
      state.image = await loadImage(url);
      drawSquare($("preview"), state.image, state.image.naturalWidth, state.image.naturalHeight);
    } else {
      // The server decodes the video whatever this browser can play; the pictures are a bonus.
      try {
        state.video = await loadVideo(url);
        await seek(state.video, 0);
        drawSquare($("preview"), state.video, state.video.videoWidth, state.video.videoHeight);
      } catch (error) {
        showFormError(`${error.message}: its frames are listed without pictures`);
      }
    }
  }

  function loadVideo(url) {
    return new Promise((resolve, reject) => {
      const video = document.createElement("video");
      video.muted = true;
      video.preload = "auto";
      video.onloadeddata = () => resolve(video);
      video.onerror = () => reject(new Error("the file is not a video this browser can play"));
      video.src = url;
    });
  }

  function seek(video, seconds) {
    return new Promise((resolve) => {
      if (Math.abs(video.currentTime - seconds) < 1e-3 && video.readyState >= 2) return resolve();
      video.onseeked = () => resolve();
      video.currentTime = seconds;
    });
  }

  // LLaVA-1.5's processor pads the picture to a square with CLIP's mean colour, then resizes: draw
  // that square, so the patch grid lies where the model's patches were.
  const PAD = "rgb(122, 116, 104)";
  function drawSquare(canvas, source, width, height) {
    const side = Math.max(width, height);
    const scale = canvas.width / side;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = PAD;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(source, ((side - width) / 2) * scale, ((side - height) / 2) * scale, width * scale, height * scale);
  }

  // ------------------------------------------------------------------ coverage

  function rgba(rgb, alpha) {
    return `rgba(${rgb[0]}, ${rgb[1]}, ${rgb[2]}, ${alpha})`;
  }

  // Paints each visual token's patches: returns how many tokens were kept and merged.
  function drawCoverage(canvas, grid, coverage) {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const [rows, cols] = grid;
    if (!rows || !cols || !coverage || !coverage.length) return { kept: 0, merged: 0 };
    const w = canvas.width / cols;
    const h = canvas.height / rows;
    const covered = new Uint8Array(rows * cols);
    let kept = 0;
    let merged = 0;
    const cell = (patch) => [(patch % cols) * w, Math.floor(patch / cols) * h];
    for (const patches of coverage) {
      const rgb = patches.length === 1 ? KEPT : MERGED[merged % MERGED.length];
      if (patches.length === 1) kept += 1; else merged += 1;
      ctx.fillStyle = rgba(rgb, FILL_ALPHA);
      for (const patch of patches) {
        covered[patch] = 1;
        const [x, y] = cell(patch);
        ctx.fillRect(x, y, w, h);
      }
    }
    ctx.fillStyle = DROPPED;
    covered.forEach((isCovered, patch) => {
      if (isCovered) return;
      const [x, y] = cell(patch);
      ctx.fillRect(x, y, w, h);
    });
    return { kept, merged };
  }

  // ------------------------------------------------------------------ one request per compressor

  function panelFor(name) {
    const panel = $("panel-template").content.firstElementChild.cloneNode(true);
    panel.dataset.compressor = name;
    panel.querySelector(".name").textContent = name;
    if (state.kind === "video") panel.classList.add("video");  // its frames are drawn below, one each
    return panel;
  }

  function setFact(panel, cls, text) {
    panel.querySelector(`.${cls}`).textContent = text;
  }

  function showPanelError(panel, text) {
    const p = panel.querySelector(".error");
    p.textContent = text;
    p.hidden = false;
    panel.dataset.state = "error";
  }

  // Server-sent events from a fetch body: yields each data payload, parsed.
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data || data === "[DONE]") continue;
        yield JSON.parse(data);
      }
    }
  }

  async function run(panel, name, mediaURL, question) {
    const budget = Number($("budget").value) || 0;
    const part = state.kind === "video"
      ? { type: "video_url", video_url: { url: mediaURL } }
      : { type: "image_url", image_url: { url: mediaURL } };
    const body = {
      model: state.model,
      messages: [{ role: "user", content: [part, { type: "text", text: question }] }],
      max_tokens: Number($("max-tokens").value) || 32,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
      return_coverage: true,
      compressor: { name },
      visual_token_budget: budget,
    };
    const started = performance.now();
    panel.dataset.state = "running";
    let response;
    try {
      response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    } catch (error) {
      return showPanelError(panel, `the server did not answer (${error.message})`);
    }
    if (!response.ok) return showPanelError(panel, await errorMessage(response));
    const answer = panel.querySelector(".answer");
    let first = null;
    for await (const event of events(response)) {
      if (event.error) return showPanelError(panel, `${event.error.code || ""} ${event.error.message}`.trim());
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) {
          first = performance.now() - started;
          setFact(panel, "ttft", `${first.toFixed(0)} ms`);
        }
        answer.textContent += delta.content;
      }
      if (event.usage) showUsage(panel, event.usage, first);
    }
    panel.dataset.state = "done";
  }

  function showUsage(panel, usage, clientTTFT) {
    const squint = usage.squint;
    const before = squint.media.reduce((sum, m) => sum + m.tokens_before, 0);
    setFact(panel, "visual-tokens", String(squint.visual_tokens));
    panel.dataset.visualTokens = String(squint.visual_tokens);
    setFact(panel, "retained", before ? `${((100 * squint.visual_tokens) / before).toFixed(1)}% of ${before}` : "–");
    const server = squint.timings.time_to_first_token_ms;
    const client = clientTTFT === null ? "–" : `${clientTTFT.toFixed(0)} ms`;
    setFact(panel, "ttft", `${client} (server ${server.toFixed(0)} ms)`);
    setFact(panel, "encode", `${squint.timings.encode_ms.toFixed(0)} ms`);
    if (state.kind === "image") {
      const m = squint.media[0];
      if (m && m.coverage) {
        const counts = drawCoverage(panel.querySelector(".overlay"), m.grid, m.coverage);
        panel.dataset.kept = String(counts.kept);
        panel.dataset.merged = String(counts.merged);
      }
    } else {
      drawFrames(panel, squint.media);
    }
  }

  async function drawFrames(panel, media) {
    const list = panel.querySelector(".frames");
    list.replaceChildren();
    for (const m of media) {
      const item = document.createElement("li");
      const canvas = document.createElement("canvas");
      canvas.width = 96;
      canvas.height = 96;
      const overlay = document.createElement("canvas");
      overlay.width = 96;
      overlay.height = 96;
      const stack = document.createElement("div");
      stack.className = "view";
      stack.append(canvas, overlay);
      const at = m.timestamp === null || m.timestamp === undefined ? "" : `${m.timestamp.toFixed(2)} s · `;
      const duplicate = m.duplicate_of !== null && m.duplicate_of !== undefined;
      item.className = duplicate ? "duplicate" : "";
      item.append(stack, `${at}${duplicate ? "dropped (repeats a frame)" : `${m.tokens_after} tokens`}`);
      list.append(item);
      if (state.video && m.timestamp !== null && m.timestamp !== undefined) {
        await seek(state.video, m.timestamp);
        drawSquare(canvas, state.video, state.video.videoWidth, state.video.videoHeight);
      }
      if (!duplicate && m.coverage) drawCoverage(overlay, m.grid, m.coverage);
    }
  }

  async function compare(event) {
    event.preventDefault();
    showFormError("");
    const names = [...document.querySelectorAll("input[name=compressor]:checked")].map((b) => b.value);
    if (!state.file) return showFormError("Choose an image or a video first.");
    if (!names.length) return showFormError("Tick at least one compressor.");
    const question = $("question").value.trim();
    if (!question) return showFormError("Type a question.");
    sessionStorage.setItem("squint-token", $("token").value);
    if (!state.model) await loadServer();
    const results = $("results");
    results.replaceChildren();
    const mediaURL = await readAsDataURL(state.file);
    $("run").disabled = true;
    const runs = names.map((name) => {
      const panel = panelFor(name);
      results.append(panel);
      const picture = panel.querySelector(".picture");
      if (state.image) drawSquare(picture, state.image, state.image.naturalWidth, state.image.naturalHeight);
      else if (state.video) drawSquare(picture, state.video, state.video.videoWidth, state.video.videoHeight);
      return run(panel, name, mediaURL, question).catch((error) => showPanelError(panel, error.message));
    });
    await Promise.all(runs);
    $("run").disabled = false;
  }

  function init() {
    $("token").value = sessionStorage.getItem("squint-token") || "";
    $("token").addEventListener("change", loadServer);
    $("media").addEventListener("change", (e) => e.target.files[0] && choose(e.target.files[0]).catch((err) => showFormError(err.message)));
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const file = e.dataTransfer.files[0];
      if (file) choose(file).catch((err) => showFormError(err.message));
    });
    $("ask").addEventListener("submit", compare);
    loadServer();
    loadExamples();
  }

  document.addEventListener("DOMContentLoaded", init);
  return { KEPT, MERGED, drawCoverage };
})();
