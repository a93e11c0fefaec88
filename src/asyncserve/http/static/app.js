// The asyncserve dashboard: polls /ui/summary and /v1/jobs once a second and draws what it gets.
// Everything the server sends is rendered as text (textContent), never parsed as HTML.
"use strict";

const POLL_MS = 1000;
const POINTS = 120; // two minutes of history per chart
const KEY_ITEM = "asyncserve-api-key";
const FINAL = new Set(["succeeded", "failed", "cancelled", "expired"]);
// Why a batcher sheds a request (asyncserve_batch_shed_rows in src/asyncserve/metrics.py).
const SHED_REASONS = ["queue_full", "deadline_unreachable", "expired", "would_expire", "cancelled"];

const models = new Map(); // label -> {card, charts, history}
const server = { history: [[], [], []], chart: null };
let selectedJob = null;
let eventsAbort = null;
let jobsEnabled = false;

// --- helpers -----------------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "text") node.textContent = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  const text = await response.text();
  let body = text;
  try { body = JSON.parse(text); } catch { /* not JSON: keep the text */ }
  return { status: response.status, ok: response.ok, body, text };
}

function errorText(result) {
  const body = result.body;
  return body && typeof body === "object" && body.error ? `${result.status} ${body.code}: ${body.error}` : `${result.status} ${result.text}`;
}

const fixed = (value, digits = 1) => (value === null || value === undefined ? "–" : Number(value).toFixed(digits));
const ms = (seconds) => (seconds === null || seconds === undefined ? "–" : `${(seconds * 1000).toFixed(1)} ms`);
const percent = (share) => `${(share * 100).toFixed(0)} %`;

function figures(list, pairs) {
  list.replaceChildren(...pairs.map(([name, value]) => el("div", {}, el("dt", { text: name }), el("dd", { text: value }))));
}

function setStatus(text, bad = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = bad ? "reason" : "muted";
}

// --- charts ------------------------------------------------------------------------------------

function chart(parent, title, metric, series) {
  const box = el("div", { class: "chart", dataset: { metric, points: "0", last: "0" } }, el("h4", { text: title }));
  parent.append(box);
  const options = {
    width: 280, height: 110, legend: { show: series.length > 1, live: false }, cursor: { show: false },
    scales: { x: { time: true } },
    axes: [{ size: 24, font: "10px sans-serif" }, { size: 40, font: "10px sans-serif" }],
    series: [{}, ...series.map((label, i) => ({ label, stroke: ["#2f6fdb", "#d9480f", "#2b8a3e", "#862e9c", "#e67700"][i % 5], width: 1.5, points: { show: false } }))],
  };
  const data = [[], ...series.map(() => [])];
  return { box, plot: new uPlot(options, data, box), data, series };
}

function push(target, time, values) {
  target.data[0].push(time);
  values.forEach((value, i) => target.data[i + 1].push(value));
  if (target.data[0].length > POINTS) target.data.forEach((column) => column.shift());
  target.plot.setData(target.data);
  target.box.dataset.points = String(target.data[0].length);
  target.box.dataset.last = String(values[0] ?? 0);
}

// --- models ------------------------------------------------------------------------------------

function modelCard(model) {
  const card = el("article", { class: "model", dataset: { model: model.label } });
  const state = el("span", { class: "state" });
  const reason = el("p", { class: "reason" });
  const stats = el("dl", { class: "figures" });
  card.append(
    el("h3", {}, `${model.label} `, state, model.streams ? el("small", { class: "muted", text: " streams" }) : ""),
    reason,
    tensors("inputs", model.inputs),
    tensors("outputs", model.outputs),
    stats,
  );
  const grid = el("div", { class: "charts" });
  card.append(grid);
  const charts = {
    throughput: chart(grid, "throughput (requests/s)", "throughput", ["req/s"]),
    latency: chart(grid, "latency (ms)", "latency", ["p50", "p99"]),
    batch: chart(grid, "mean batch size, queue depth (rows)", "batch", ["batch", "queue"]),
    shed: chart(grid, "shed (requests/s) by reason", "shed", SHED_REASONS),
  };
  card.append(tryForm(model));
  document.getElementById("models").append(card);
  return { card, state, reason, stats, charts };
}

function tensors(title, list) {
  const text = list.map((t) => `${t.name}: ${t.datatype}${JSON.stringify(t.shape)}`).join(", ");
  return el("p", { class: "tensors" }, el("span", { class: "muted", text: `${title} ` }), text);
}

function updateModel(model, time) {
  let view = models.get(model.label);
  if (!view) { view = modelCard(model); models.set(model.label, view); }
  view.state.textContent = model.state;
  view.state.className = `state ${model.state}`;
  view.reason.textContent = model.reason || "";
  const s = model.stats;
  const shedTotal = Object.entries(s.shed_total).filter(([, n]) => n > 0).map(([why, n]) => `${why} ${n}`).join(", ");
  figures(view.stats, [
    ["requests/s", fixed(s.requests_per_s)], ["p50", ms(s.p50_s)], ["p99", ms(s.p99_s)],
    ["mean batch", fixed(s.mean_batch_rows)], ["queued rows", String(s.queued_rows)],
    ["requests", String(s.requests_total)], ["shed", shedTotal || "none"],
  ]);
  push(view.charts.throughput, time, [s.requests_per_s]);
  push(view.charts.latency, time, [s.p50_s === null ? null : s.p50_s * 1000, s.p99_s === null ? null : s.p99_s * 1000]);
  push(view.charts.batch, time, [s.mean_batch_rows, s.queued_rows]);
  push(view.charts.shed, time, SHED_REASONS.map((reason) => s.shed_per_s[reason] || 0));
}

// --- try it ------------------------------------------------------------------------------------

function tryForm(model) {
  const form = el("form", { class: "try", dataset: { model: model.label } });
  const fields = model.inputs.map((input) => {
    const example = model.example && input.name in model.example ? JSON.stringify(model.example[input.name]) : "";
    const area = el("textarea", { name: input.name, rows: "2", placeholder: `JSON, e.g. ${input.datatype === "BYTES" ? '"some text"' : "[1.0, 2.0]"}` });
    area.value = example;
    form.append(el("label", { text: `${input.name} (${input.datatype}, ${input.shape.length > 1 ? `shape ${JSON.stringify(input.shape.slice(1))}` : "one value"} per row)` }), area);
    return area;
  });
  const answer = el("pre", { class: "answer", dataset: { role: "answer" } });
  const predict = el("button", { type: "submit", text: "Predict" });
  const submitJob = el("button", { type: "button", text: "Submit as job", dataset: { role: "job" } });
  form.append(el("p", {}, predict, " ", submitJob), answer);
  const row = () => Object.fromEntries(fields.map((area) => [area.name, parseValue(area.value)]));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    answer.textContent = "…";
    const path = `/v1/models/${encodeURIComponent(model.name)}/predict`;
    const result = await api(path, { method: "POST", body: JSON.stringify(row()), headers: { "Content-Type": "application/json" } });
    answer.textContent = result.ok ? JSON.stringify(result.body, null, 2) : errorText(result);
  });
  submitJob.addEventListener("click", async () => {
    const job = { model: model.name, inputs: row() };
    if (model.version) job.version = model.version;
    const result = await api("/v1/jobs", { method: "POST", body: JSON.stringify(job), headers: { "Content-Type": "application/json" } });
    answer.textContent = result.ok ? `job ${result.body.id}: ${result.body.status}` : errorText(result);
    if (result.ok) { await refreshJobs(); follow(result.body.id); }
  });
  return form;
}

function parseValue(text) {
  try { return JSON.parse(text); } catch { return text; } // plain text is a BYTES value
}

// --- the server --------------------------------------------------------------------------------

function updateServer(summary, time) {
  const s = summary.server;
  figures(document.getElementById("server"), [
    ["loop lag", ms(s.loop_lag_s)], ["in flight", String(s.in_flight)], ["executor use", percent(s.executor_use)],
    ["workers", String(summary.workers.length)],
  ]);
  if (!server.chart) server.chart = chart(document.getElementById("server-chart"), "event-loop lag (ms), executor use (%)", "server", ["lag ms", "executor %"]);
  push(server.chart, time, [s.loop_lag_s * 1000, s.executor_use * 100]);
  document.querySelector("#workers tbody").replaceChildren(...summary.workers.map((w) => el("tr", {},
    el("td", { text: String(w.worker) }), el("td", { text: ms(w.loop_lag_s) }), el("td", { text: String(w.in_flight) }),
    el("td", { text: percent(w.executor_use) }), el("td", { text: fixed(w.requests_per_s) }))));
}

// --- jobs --------------------------------------------------------------------------------------

function updateJobCounts(jobs) {
  jobsEnabled = jobs !== null;
  document.getElementById("jobs-message").textContent = jobsEnabled ? "" : "This server runs no jobs (no --jobs broker).";
  figures(document.getElementById("job-counts"), jobsEnabled ? Object.entries(jobs.counts).map(([state, n]) => [state, String(n)]) : []);
}

async function refreshJobs() {
  if (!jobsEnabled) return;
  const result = await api("/v1/jobs?limit=10");
  const body = document.querySelector("#jobs tbody");
  if (!result.ok) { body.replaceChildren(el("tr", {}, el("td", { colspan: "6", class: "reason", text: errorText(result) }))); return; }
  body.replaceChildren(...result.body.jobs.map(jobRow));
}

function jobRow(job) {
  const cancel = FINAL.has(job.status) ? "" : el("button", { type: "button", text: "Cancel", dataset: { role: "cancel" }, onclick: (e) => { e.stopPropagation(); cancelJob(job.id); } });
  const row = el("tr", { dataset: { job: job.id, status: job.status }, class: job.id === selectedJob ? "selected" : "", onclick: () => follow(job.id) },
    el("td", { text: job.id.slice(0, 12) }), el("td", { text: job.version ? `${job.model}:${job.version}` : job.model }),
    el("td", {}, el("span", { class: `state ${job.status}`, text: job.status })),
    el("td", { text: `${job.attempts}/${job.max_attempts}` }),
    el("td", { text: new Date(job.created_at * 1000).toLocaleTimeString() }), el("td", {}, cancel));
  return row;
}

async function cancelJob(id) {
  const result = await api(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
  if (!result.ok) setStatus(`cancel ${id}: ${errorText(result)}`, true);
  await refreshJobs();
}

// A job's Server-Sent Events, read with fetch (EventSource cannot send the API key).
async function follow(id) {
  if (eventsAbort) eventsAbort.abort();
  eventsAbort = new AbortController();
  selectedJob = id;
  document.getElementById("events-job").textContent = id;
  const out = document.getElementById("events");
  out.textContent = "";
  try {
    const response = await fetch(`/v1/jobs/${encodeURIComponent(id)}/events`, { headers: headers(), signal: eventsAbort.signal });
    if (!response.ok) { out.textContent = `${response.status} ${await response.text()}`; return; }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        showEvent(out, buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") out.append(`\n${error}`);
  }
}

function showEvent(out, block) {
  const lines = block.split("\n");
  const event = (lines.find((l) => l.startsWith("event: ")) || "event: message").slice(7);
  const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
  let detail = "";
  try {
    const job = JSON.parse(data);
    detail = job.error ? ` error: ${job.error}` : job.result !== null && job.result !== undefined ? ` result: ${JSON.stringify(job.result)}` : "";
  } catch { detail = ` ${data}`; }
  out.append(`${new Date().toLocaleTimeString()} ${event}${detail}\n`);
  out.dataset.last = event;
}

// --- polling -----------------------------------------------------------------------------------

async function poll() {
  const started = Date.now();
  try {
    const result = await api("/ui/summary");
    if (result.ok) {
      render(result.body);
      setStatus(`updated ${new Date().toLocaleTimeString()}`);
      await refreshJobs();
    } else if (result.status === 401 || result.status === 403) {
      setStatus(`${errorText(result)} (paste a key with the metrics scope above)`, true);
    } else {
      setStatus(errorText(result), true);
    }
  } catch (error) {
    setStatus(`the server does not answer: ${error}`, true);
  }
  setTimeout(poll, Math.max(0, POLL_MS - (Date.now() - started)));
}

function render(summary) {
  const time = summary.time;
  document.getElementById("service").textContent = summary.service;
  document.getElementById("version").textContent = `asyncserve ${summary.version}`;
  updateServer(summary, time);
  updateJobCounts(summary.jobs);
  for (const model of summary.models) updateModel(model, time);
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("key");
  if (input.value.trim()) sessionStorage.setItem(KEY_ITEM, input.value.trim());
  input.value = "";
});
document.getElementById("forget-key").addEventListener("click", () => sessionStorage.removeItem(KEY_ITEM));
poll();
