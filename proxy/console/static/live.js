// Live: the audit log as it grows. The last 200 matching rows, then the event stream of
// /api/decisions/stream from the newest id (read with fetch: EventSource cannot send the
// token's header); a filter change restarts both.
import { api, banner, bytes, chip, clearBanner, count, el, emptyRow, eventStream, ms, query, text, time, usd } from "/static/common.js";

const MAX_ROWS = 500;
const form = document.getElementById("filters");
const tbody = document.querySelector("#decisions tbody");
const state = document.getElementById("stream-state");
const detail = document.getElementById("detail");
const split = document.querySelector(".split");

let source = null; // the running stream's AbortController
let generation = 0;
let lastId = 0;
let selected = null;
let retry = null;

function filters() {
  const data = new FormData(form);
  return { agent: data.get("agent").trim(), host: data.get("host").trim(), decision: data.get("decision") };
}

function setState(cls, label) {
  state.className = `state ${cls}`;
  state.textContent = label;
}

function hostport(r) {
  if (!r.host) return "";
  const dflt = (r.scheme === "https" && r.port === 443) || (r.scheme === "http" && r.port === 80);
  return r.port && !dflt ? `${r.host}:${r.port}` : r.host;
}

function requestCell(r) {
  if (r.kind === "event") {
    return el(
      "td",
      { class: "request" },
      el("div", { class: "line", title: r.reason || "" }, el("span", { class: "method" }, text(r.method)), el("span", { class: "path" }, r.reason || r.rule || "")),
    );
  }
  const full = `${r.method || ""} ${hostport(r)}${r.path || ""}`.trim();
  return el(
    "td",
    { class: "request" },
    el(
      "div",
      { class: "line", title: full },
      r.method ? el("span", { class: "method" }, r.method) : null,
      el("span", { class: "host" }, hostport(r) || "—"),
      r.path ? el("span", { class: "path" }, r.path) : null,
    ),
  );
}

function tokens(r) {
  if (r.input_tokens === null && r.output_tokens === null) return "—";
  return `${count(r.input_tokens ?? 0)} → ${count(r.output_tokens ?? 0)}`;
}

function rowFor(r, fresh) {
  const tr = el(
    "tr",
    { dataset: { id: r.id }, class: fresh ? "fresh" : null, title: r.reason || null },
    el("td", { class: "when" }, time(r.ts)),
    el("td", { class: "who" }, text(r.agent), r.session ? el("div", { class: "muted" }, r.session) : null),
    el("td", {}, chip(r.decision, r.kind)),
    requestCell(r),
    el("td", { class: "num" }, text(r.status)),
    el("td", { class: "num" }, tokens(r)),
    el("td", { class: "num", title: r.cost_usd ? `${r.cost_usd} USD` : null }, usd(r.cost_usd)),
    el("td", { class: "num" }, ms(r.duration_ms)),
  );
  if (String(r.id) === selected) tr.classList.add("selected");
  return tr;
}

function showEmpty() {
  if (tbody.querySelector("tr[data-id]")) return;
  const f = filters();
  const filtered = f.agent || f.host || f.decision;
  tbody.replaceChildren(
    emptyRow(8, filtered ? "No decisions match these filters yet. New ones appear here as they happen." : "No decisions yet. Send a request through the proxy and it appears here within a second."),
  );
}

function add(rows, fresh) {
  const empty = tbody.querySelector("tr.empty");
  if (empty && rows.length) empty.remove();
  for (const r of rows) {
    if (r.id <= lastId && tbody.querySelector(`tr[data-id="${CSS.escape(String(r.id))}"]`)) continue;
    lastId = Math.max(lastId, r.id);
    tbody.prepend(rowFor(r, fresh));
  }
  while (tbody.rows.length > MAX_ROWS) tbody.lastElementChild.remove();
}

function stop() {
  generation += 1;
  clearTimeout(retry);
  if (source) source.abort();
  source = null;
}

async function start() {
  stop();
  const mine = generation;
  const f = filters();
  history.replaceState(null, "", `/live${query(f)}`);
  setState("", "loading…");
  try {
    const data = await api(`/api/decisions${query({ ...f, limit: 200 })}`);
    if (mine !== generation) return;
    lastId = 0;
    tbody.replaceChildren();
    add(data.rows, false);
    lastId = Math.max(lastId, data.last || 0);
    showEmpty();
    clearBanner();
    document.body.dataset.ready = "1";
  } catch (err) {
    if (mine !== generation) return;
    banner(err.message);
    setState("down", err.status === 401 ? "not signed in" : "not connected");
    if (err.status !== 401) retry = setTimeout(start, 3000);
    return;
  }
  listen(mine, f, { lastEventId: "" });
}

async function listen(mine, f, sse) {
  const controller = new AbortController();
  source = controller;
  try {
    await eventStream(`/api/decisions/stream${query({ ...f, after: lastId })}`, {
      signal: controller.signal,
      state: sse, // its lastEventId goes back as Last-Event-ID when we reconnect
      onOpen: () => {
        if (mine !== generation) return;
        setState("live", "live");
        if (sse.lastEventId) clearBanner(); // back after an error the banner showed
      },
      onEvent: (type, data) => {
        if (mine !== generation) return;
        if (type === "row") {
          try {
            add([JSON.parse(data)], true);
          } catch (err) {
            /* a malformed event: skip it */
          }
        } else if (type === "gap") {
          start(); // more rows came at once than the stream sends: reload the newest
        }
      },
    });
  } catch (err) {
    if (mine !== generation || controller.signal.aborted) return;
    if (err.status === 401) {
      banner(err.message);
      setState("down", "not signed in");
      return;
    }
  }
  if (mine !== generation || controller.signal.aborted) return;
  // the stream failed or ended (the console stopped?): say why if it refuses us, then resume after the last id
  setState("down", "reconnecting…");
  try {
    await api("/api/decisions?limit=1");
  } catch (err) {
    banner(err.message);
    if (err.status === 401) return;
  }
  retry = setTimeout(() => {
    if (mine === generation) listen(mine, f, sse);
  }, 2000);
}

// --- the detail panel ---------------------------------------------------------------------

const GROUPS = [
  ["Decision", ["decision", "kind", "reason", "rule"]],
  ["Request", ["ts", "request_id", "method", "scheme", "host", "port", "path", "status", "client"]],
  ["Agent", ["agent", "session"]],
  ["Credential", ["service", "credential"]],
  ["Usage", ["model", "input_tokens", "output_tokens", "cached_tokens", "cost_usd", "request_bytes", "response_bytes", "duration_ms"]],
  ["WebSocket", ["ws_messages_out", "ws_messages_in", "ws_close_code"]],
];

function value(name, v, row) {
  if (v === null || v === undefined || v === "") return el("span", { class: "muted" }, "—");
  switch (name) {
    case "decision":
      return chip(v); // the row's own decision, also for an event (the table shows "event")
    case "kind":
      return v === "event" ? chip(row.decision, "event") : String(v);
    case "ts":
      return el("span", {}, time(v), el("div", { class: "muted mono" }, v));
    case "cost_usd":
      return `${usd(v)} (${v} USD)`;
    case "request_bytes":
    case "response_bytes":
      return bytes(v);
    case "duration_ms":
      return ms(v);
    case "input_tokens":
    case "output_tokens":
    case "cached_tokens":
      return count(v);
    case "credential":
      return String(v).startsWith("denied") || String(v).startsWith("error") ? el("span", { class: "chip deny" }, v) : el("span", { class: "chip plain" }, v);
    case "request_id":
    case "path":
    case "rule":
      return el("span", { class: "mono" }, String(v));
    default:
      return typeof v === "object" ? JSON.stringify(v) : String(v);
  }
}

async function open(id) {
  selected = String(id);
  for (const tr of tbody.querySelectorAll("tr.selected")) tr.classList.remove("selected");
  const tr = tbody.querySelector(`tr[data-id="${CSS.escape(selected)}"]`);
  if (tr) tr.classList.add("selected");
  let row;
  try {
    row = await api(`/api/decisions/${encodeURIComponent(id)}`);
  } catch (err) {
    banner(err.message);
    return;
  }
  if (selected !== String(id)) return;
  const fields = document.getElementById("detail-fields");
  const shown = new Set(["id"]);
  const items = [];
  for (const [title, names] of GROUPS) {
    const present = names.filter((n) => n in row && (title === "Decision" || row[n] !== null));
    if (!present.length) continue;
    items.push(el("div", { class: "section" }, title));
    for (const n of present) {
      shown.add(n);
      items.push(el("dt", {}, n.replaceAll("_", " ")), el("dd", { dataset: { field: n } }, value(n, row[n], row)));
    }
  }
  const rest = Object.keys(row).filter((n) => !shown.has(n) && row[n] !== null);
  if (rest.length) {
    items.push(el("div", { class: "section" }, "More"));
    for (const n of rest) items.push(el("dt", {}, n.replaceAll("_", " ")), el("dd", { dataset: { field: n } }, value(n, row[n], row)));
  }
  fields.replaceChildren(...items);
  document.getElementById("detail-title").replaceChildren(`Decision #${row.id}`);
  detail.hidden = false;
  detail.classList.add("open");
  split.classList.add("with-detail");
}

function close() {
  selected = null;
  detail.hidden = true;
  detail.classList.remove("open");
  split.classList.remove("with-detail");
  for (const tr of tbody.querySelectorAll("tr.selected")) tr.classList.remove("selected");
}

tbody.addEventListener("click", (event) => {
  const tr = event.target.closest("tr[data-id]");
  if (tr) open(tr.dataset.id);
});
document.getElementById("detail-close").addEventListener("click", close);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") close();
});

// --- filters ----------------------------------------------------------------------------

let debounce = null;
form.addEventListener("input", () => {
  clearTimeout(debounce);
  debounce = setTimeout(start, 350);
});
form.addEventListener("submit", (event) => {
  event.preventDefault();
  start();
});
form.addEventListener("reset", () => setTimeout(start, 0));

const given = new URLSearchParams(location.search);
for (const name of ["agent", "host", "decision"]) if (given.get(name)) form.elements[name].value = given.get(name);

api("/api/agents")
  .then((agents) => document.getElementById("agent-names").replaceChildren(...agents.map((a) => el("option", { value: a.agent }))))
  .catch(() => {});

start();
