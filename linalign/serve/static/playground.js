// linalign playground: every column is one streaming request to the server's own chat completions API,
// all sent at once so that the server can decode them together. Plain JavaScript, no build step.
"use strict";

const ENDPOINT = "v1/chat/completions";
const KEY_STORAGE = "linalign.apiKey";
const TOP_K = 5;
const METHOD_TITLES = {
  base: "Base (no principle)",
  prompt: "Prompt (principle as system message)",
  la: "Linear Alignment",
  amulet: "Amulet (authors' defaults)",
};
const DEFAULT_PRINCIPLE = "Answer in lowercase letters only. Never use capital letters.";

let controller = null; // the AbortController of the run in progress
let rowCount = 0; // makes element ids unique

const byId = (id) => document.getElementById(id);

// ---- small DOM helpers

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

function labelled(labelText, control, className = "") {
  const id = `${control.tagName.toLowerCase()}-${++rowCount}`;
  control.id = id;
  return el("div", { class: className }, el("label", { for: id }, labelText), control);
}

function removeButton(row, what) {
  const button = el("button", { type: "button", class: "secondary", "aria-label": `Remove this ${what}` }, "Remove");
  button.addEventListener("click", () => {
    const next = row.nextElementSibling || row.previousElementSibling;
    row.remove();
    (next?.querySelector("textarea") || byId(`add-${what === "turn" ? "turn" : "principle"}`)).focus();
  });
  return button;
}

// ---- the rows of the form: earlier turns and principles

function addTurn(role, content = "") {
  const select = el("select", {}, el("option", { value: "user" }, "User"), el("option", { value: "assistant" }, "Assistant"));
  select.value = role;
  const text = el("textarea", { rows: 2, class: "turn-content" }, content);
  const row = el("li", { class: "row turn" });
  row.append(labelled("Role", select), removeButton(row, "turn"), labelled("Message", text, "wide"));
  byId("turns").append(row);
  return text;
}

function nextTurnRole() {
  const roles = [...byId("turns").querySelectorAll("select")].map((s) => s.value);
  return roles.at(-1) === "user" ? "assistant" : "user";
}

function addPrinciple(text = "", weight = 1) {
  const area = el("textarea", { rows: 3, class: "principle-text" }, text);
  const number = el("input", { type: "number", step: "any", value: weight, class: "principle-weight narrow" });
  number.setAttribute("aria-describedby", "weight-hint");
  const row = el("li", { class: "row principle" });
  const first = !byId("principles").children.length;
  row.append(labelled("Principle", area, "wide"), labelled("Weight", number));
  row.append(first ? el("span") : removeButton(row, "principle"));
  byId("principles").append(row);
  return area;
}

// ---- reading the settings

function readNumber(text) {
  const value = Number(text);
  // What is not a number goes to the server as typed, so that its 400 names the problem.
  return text.trim() !== "" && Number.isFinite(value) ? value : text.trim();
}

function readMessages() {
  const turns = [...byId("turns").children].map((row) => ({
    role: row.querySelector("select").value,
    content: row.querySelector("textarea").value,
  }));
  return [...turns.filter((t) => t.content.trim()), { role: "user", content: byId("question").value }];
}

function readPrinciples() {
  return [...byId("principles").children]
    .map((row) => ({
      text: row.querySelector(".principle-text").value,
      weight: readNumber(row.querySelector(".principle-weight").value),
    }))
    .filter((p) => p.text.trim());
}

function readSettings() {
  const sampling = byId("sample").checked;
  return {
    messages: readMessages(),
    principles: readPrinciples(),
    ratio: readNumber(byId("ratio-value").value),
    maxTokens: readNumber(byId("max-tokens").value),
    temperature: sampling ? readNumber(byId("temperature").value) : 0, // 0 is greedy decoding
    seed: sampling ? readNumber(byId("seed").value) : "",
  };
}

function sweeping() {
  return byId("mode-sweep").checked;
}

function checkedMethods() {
  return [...document.querySelectorAll('input[name="method"]:checked')].map((box) => box.value);
}

function sweepRatios() {
  return byId("ratios").value.split(/[\s,;]+/).filter(Boolean).map(readNumber);
}

// ---- what each column asks the server

function alignOptions(method, ratio, principles) {
  if (method === "base") return { method };
  // Amulet takes one principle: the positively weighted one where there is one (the server tells the model
  // only positively weighted principles, whatever the method, so the others would change nothing).
  const positive = principles.filter((p) => p.weight > 0);
  const sent = method === "amulet" && positive.length ? positive : principles;
  const options = { method, principles: sent.map((p) => p.text), ...(method === "la" ? { ratio } : {}) };
  // The server weighs principle i by weights[i] * (1 + r); all 1 (its default) is the paper's l_p + r (l_p - l_0).
  if (sent.some((p) => p.weight !== 1)) options.weights = sent.map((p) => p.weight);
  return options;
}

function columnSpecs(settings) {
  if (sweeping()) {
    return sweepRatios().map((r) => ({
      title: `Linear Alignment, r = ${r}`,
      options: alignOptions("la", r, settings.principles),
    }));
  }
  return checkedMethods().map((m) => ({
    title: m === "la" ? `${METHOD_TITLES.la}, r = ${settings.ratio}` : METHOD_TITLES[m],
    options: alignOptions(m, settings.ratio, settings.principles),
  }));
}

function requestBody(settings, options) {
  const body = {
    messages: settings.messages,
    max_tokens: settings.maxTokens,
    temperature: settings.temperature,
    stream: true,
    stream_options: { include_usage: true },
    logprobs: true,
    top_logprobs: TOP_K,
    linalign: options,
  };
  if (settings.seed !== "") body.seed = settings.seed;
  return body;
}

function headers() {
  const key = byId("api-key").value.trim();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

// ---- columns

function createColumn(spec, index) {
  const column = {
    spec,
    tokens: 0,
    usage: null,
    finish: null,
    error: null,
    pending: [], // logprobs of tokens whose text has not arrived yet
    positions: 0,
    firstAt: null, // when the first and the latest token arrived
    lastAt: null,
  };
  const headingId = `column-${index}-title`;
  column.output = el("div", {
    class: "output",
    tabindex: 0,
    "aria-labelledby": headingId,
    "aria-describedby": `column-${index}-help`,
    "aria-busy": "true",
  });
  column.meta = el("p", { class: "meta" }, "waiting for the server…");
  column.errorBox = el("p", { class: "error", role: "alert", hidden: true });
  column.panel = el("div", { class: "candidates", "aria-live": "polite", hidden: true });
  column.article = el(
    "article",
    { class: "column", "aria-labelledby": headingId },
    el("h2", { id: headingId }, spec.title),
    el("p", { id: `column-${index}-help`, class: "visually-hidden" }, "Click a token, or use the arrow keys, to see its candidates."),
    column.output,
    column.meta,
    column.errorBox,
    column.panel,
  );
  column.output.addEventListener("click", (event) => {
    const token = event.target.closest(".tok");
    if (token) selectToken(column, token);
  });
  column.output.addEventListener("keydown", (event) => moveSelection(column, event));
  return column;
}

function appendText(column, text) {
  const span = el("span", { class: "tok" }, text);
  span.logprobs = column.pending;
  column.pending = [];
  column.output.append(span);
}

// Decoding speed: tokens after the first over the time since the first (queueing and the prompt left out).
function tokensPerSecond(column, tokens) {
  const seconds = (column.lastAt - column.firstAt) / 1000;
  return tokens > 1 && seconds > 0 ? `${((tokens - 1) / seconds).toFixed(1)} tokens/s` : null;
}

function updateMeta(column) {
  const tokens = column.usage ?? column.tokens;
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`, tokensPerSecond(column, tokens)].filter(Boolean);
  parts.push(`finish: ${column.finish ?? "…"}`);
  column.meta.textContent = parts.join(" · ");
}

function showError(column, message) {
  column.error = message;
  column.errorBox.textContent = message;
  column.errorBox.hidden = false;
}

function endColumn(column, finish) {
  column.finish ??= finish;
  const last = column.output.lastElementChild;
  if (last && column.pending.length) last.logprobs = [...last.logprobs, ...column.pending];
  column.output.setAttribute("aria-busy", "false");
  updateMeta(column);
}

// ---- streaming

class ServerError extends Error {}

async function errorMessage(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error.message;
  } catch {
    return `${response.status} ${response.statusText}: ${text.slice(0, 200)}`;
  }
}

// Yields the data of each server-sent event of `stream`.
async function* sseData(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r\n\r\n|\n\n|\r\r/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^(\r\n\r\n|\n\n|\r\r)/, "");
      const data = event
        .split(/\r\n|\n|\r/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

// Python's json module writes NaN and -Infinity (a masked token's logprob), which JSON.parse refuses:
// read them as null, leaving string literals alone.
function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return JSON.parse(text.replace(/"(?:[^"\\]|\\.)*"|-?Infinity|NaN/g, (m) => (m.startsWith('"') ? m : "null")));
  }
}

function handleEvent(column, event) {
  if (event.error) throw new ServerError(event.error.message);
  if (event.usage) column.usage = event.usage.completion_tokens;
  for (const choice of event.choices || []) {
    const items = choice.logprobs?.content || [];
    for (const item of items) item.position = column.positions++;
    column.pending.push(...items);
    const text = choice.delta?.content;
    const tokens = items.length || (text ? 1 : 0);
    if (tokens) {
      column.firstAt ??= performance.now();
      column.lastAt = performance.now();
    }
    column.tokens += tokens;
    if (text) appendText(column, text);
    if (choice.finish_reason) column.finish = choice.finish_reason;
  }
  updateMeta(column);
}

async function streamColumn(column, body, signal) {
  try {
    const response = await fetch(ENDPOINT, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
    if (!response.ok) {
      showError(column, await errorMessage(response));
      return endColumn(column, "error");
    }
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      handleEvent(column, parseJson(data));
    }
    endColumn(column, "stopped");
  } catch (err) {
    if (err.name === "AbortError") return endColumn(column, "stopped");
    showError(column, err instanceof ServerError ? err.message : `request failed: ${err.message}`);
    endColumn(column, "error");
  }
}

// ---- token candidates

function formatToken(token) {
  return JSON.stringify(token ?? "");
}

function formatProbability(logprob) {
  return typeof logprob === "number" ? `${(Math.exp(logprob) * 100).toFixed(1)}%` : "–";
}

function candidateList(title, entries, chosen) {
  const section = el("section", { class: "distribution" }, el("h4", {}, title));
  if (!entries?.length) {
    section.append(el("p", { class: "hint" }, "not used by this method"));
    return section;
  }
  const list = el("ol");
  for (const entry of entries.slice(0, TOP_K)) {
    const mark = entry.token === chosen ? el("span", { class: "visually-hidden" }, " (chosen)") : "";
    const item = el("li", { class: entry.token === chosen ? "chosen" : null });
    item.append(el("code", {}, formatToken(entry.token)), " ", el("span", { class: "prob" }, formatProbability(entry.logprob)), mark);
    list.append(item);
  }
  section.append(list);
  return section;
}

function candidateView(item) {
  const extension = item.linalign || {};
  return el(
    "div",
    { class: "position" },
    el("h3", {}, `Token ${item.position + 1}: ${formatToken(item.token)}`),
    el(
      "div",
      { class: "distributions" },
      candidateList("Principled", extension.principled, item.token),
      candidateList("Plain", extension.plain, item.token),
      candidateList("Aligned", item.top_logprobs, item.token),
    ),
  );
}

function selectToken(column, token) {
  column.output.querySelector(".tok.selected")?.classList.remove("selected");
  token.classList.add("selected");
  const items = token.logprobs || [];
  column.panel.replaceChildren(
    ...(items.length
      ? items.map(candidateView)
      : [el("p", { class: "hint" }, "No candidates for this token: the server sent no logprobs.")]),
  );
  column.panel.hidden = false;
}

function moveSelection(column, event) {
  const steps = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 };
  if (!(event.key in steps)) return;
  const tokens = [...column.output.querySelectorAll(".tok")];
  if (!tokens.length) return;
  event.preventDefault();
  const current = tokens.findIndex((t) => t.classList.contains("selected"));
  const next = current < 0 ? 0 : Math.min(Math.max(current + steps[event.key], 0), tokens.length - 1);
  selectToken(column, tokens[next]);
}

// ---- running

function setStatus(message, failed = false) {
  const status = byId("status");
  status.textContent = message;
  status.classList.toggle("failed", failed);
}

function setRunning(running) {
  byId("stop").disabled = !running;
}

function summary(columns, stopped) {
  const failed = columns.filter((c) => c.error);
  if (failed.length) return [`${failed.length} of ${columns.length} columns failed: ${failed[0].error}`, true];
  return [stopped ? "Stopped." : `Done: ${columns.length} column${columns.length === 1 ? "" : "s"}.`, false];
}

async function run() {
  stop();
  const settings = readSettings();
  const specs = columnSpecs(settings);
  if (!specs.length) {
    setStatus(sweeping() ? "Give at least one ratio to sweep." : "Choose at least one method.", true);
    return;
  }
  const mine = new AbortController();
  controller = mine;
  const columns = specs.map(createColumn);
  byId("columns").replaceChildren(...columns.map((c) => c.article));
  setRunning(true);
  setStatus(`Running ${columns.length} column${columns.length === 1 ? "" : "s"}…`);
  await Promise.all(columns.map((c) => streamColumn(c, requestBody(settings, c.spec.options), mine.signal)));
  if (controller !== mine) return; // a newer run owns the status now
  controller = null;
  setRunning(false);
  setStatus(...summary(columns, mine.signal.aborted));
}

function stop() {
  controller?.abort();
}

// ---- wiring

function toggleMode() {
  byId("methods").hidden = sweeping();
  byId("sweep").hidden = !sweeping();
  byId("ratio-field").hidden = sweeping();
}

function toggleSampling() {
  const sampling = byId("sample").checked;
  byId("temperature").disabled = !sampling;
  byId("seed").disabled = !sampling;
}

function syncRatio(source, target) {
  target.value = source.value;
}

function storeKey() {
  try {
    const key = byId("api-key").value;
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage may be disabled; the key still works for this page
  }
}

function loadKey() {
  try {
    byId("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    // storage may be disabled
  }
}

async function showModel() {
  try {
    const response = await fetch("health");
    if (response.ok) byId("model-name").textContent = `Model: ${(await response.json()).model}.`;
  } catch {
    // the name is a courtesy; the page works without it
  }
}

function wire() {
  addPrinciple(DEFAULT_PRINCIPLE, 1);
  loadKey();
  byId("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      run();
    }
  });
  byId("stop").addEventListener("click", stop);
  byId("add-turn").addEventListener("click", () => addTurn(nextTurnRole()).focus());
  byId("add-principle").addEventListener("click", () => addPrinciple("", 1).focus());
  byId("api-key").addEventListener("input", storeKey);
  byId("ratio").addEventListener("input", () => syncRatio(byId("ratio"), byId("ratio-value")));
  byId("ratio-value").addEventListener("input", () => syncRatio(byId("ratio-value"), byId("ratio")));
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", toggleMode);
  for (const radio of document.querySelectorAll('input[name="decoding"]')) radio.addEventListener("change", toggleSampling);
  toggleMode();
  toggleSampling();
  showModel();
}

wire();
