// Shared by every console page: the sign-in (the token from the address's #token= fragment,
// kept in this tab's sessionStorage), the API call (the token as an Authorization header,
// never a cookie), the event stream reader, the error banner, DOM building (text only: a
// value from the API never becomes markup), and formatting.

// --- the token ------------------------------------------------------------------------------
// `egress-guard console` prints http://127.0.0.1:PORT/#token=TOKEN. The fragment never leaves
// the browser (no request, no Referer carries it); it is moved into sessionStorage, which is
// per origin (scheme, host AND port: unlike a cookie, another server on 127.0.0.1 cannot read
// it) and per tab, and kept across this tab's navigation; the address bar loses it at once.

const TOKEN_KEY = "egress-guard.console.token";
const SIGN_IN = "Not signed in: open the link `egress-guard console` printed when it started (http://127.0.0.1:…/#token=…) in this tab.";

function takeToken() {
  const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
  const given = fragment.get("token");
  if (given !== null) {
    if (given) sessionStorage.setItem(TOKEN_KEY, given);
    history.replaceState(history.state, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

const token = takeToken();

/** True once the tab holds a token (the pages call nothing without one). */
export const signedIn = Boolean(token);

/** Build an element: el("td", {class: "num", title: iso}, "text", childNode, ...). */
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The headers every API request carries: the token (the only credential the console takes). */
function authorized(extra = {}) {
  return { ...extra, Authorization: `Bearer ${token}` };
}

async function failure(response) {
  let message = response.statusText || `HTTP ${response.status}`;
  try {
    const data = await response.json();
    message = data.error || data.message || message;
  } catch (err) {
    /* not JSON: keep the status text */
  }
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY); // a wrong token (the console restarted with a new one): ask for the link
    message = "The console refused the token (it restarted with a new one?): open the link `egress-guard console` printed (http://127.0.0.1:…/#token=…).";
  }
  return new ApiError(response.status, message);
}

/** Call the console's API: GET (no body) or POST a JSON body. A 401 (no token, or a wrong
 * one) is an ApiError with status 401: the pages stop asking then. */
export async function api(path, body) {
  if (!token) throw new ApiError(401, SIGN_IN);
  const init = { credentials: "omit", cache: "no-store", headers: authorized({ Accept: "application/json" }) };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "the console does not answer: is `egress-guard console` still running?");
  }
  if (!response.ok) throw await failure(response);
  return response.json();
}

/**
 * Read a server-sent event stream with the token as a header (EventSource cannot send one).
 * Calls `onOpen()` once the answer is 200, then `onEvent(type, data, id)` for each event;
 * `: ping` comments and `retry:` lines are read and skipped. `state.lastEventId` holds the
 * last `id:` seen, sent back as Last-Event-ID (the server resumes after it). Resolves when
 * the server ends the stream, rejects on an error (an ApiError for a refusal), or when
 * `signal` aborts.
 */
export async function eventStream(path, { signal, state, onOpen, onEvent }) {
  if (!token) throw new ApiError(401, SIGN_IN);
  const headers = authorized({ Accept: "text/event-stream" });
  if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
  let response;
  try {
    response = await fetch(path, { credentials: "omit", cache: "no-store", headers, signal });
  } catch (err) {
    if (signal && signal.aborted) throw err;
    throw new ApiError(0, "the console does not answer: is `egress-guard console` still running?");
  }
  if (!response.ok) throw await failure(response);
  onOpen();
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let type = "";
  let data = [];
  let id = null;
  const line = (text) => {
    if (text === "") {
      // a blank line ends an event (one with no data is no event)
      if (id !== null) state.lastEventId = id;
      if (data.length) onEvent(type || "message", data.join("\n"), state.lastEventId);
      type = "";
      data = [];
      id = null;
      return;
    }
    if (text.startsWith(":")) return; // a comment: the server's keep-alive ping
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
    else if (field === "id" && !value.includes("\0")) id = value;
    // "retry" and unknown fields: nothing to do (the page picks its own delay)
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const parts = buffer.split("\n"); // the console ends lines with \n (a \r before it is dropped)
    buffer = parts.pop(); // an unfinished line waits for the next chunk
    for (const part of parts) line(part.endsWith("\r") ? part.slice(0, -1) : part);
  }
}

/** The banner under the nav: an error (kind "error") or a notice (kind "ok"). */
let noticeTimer = null;
export function banner(message, kind = "error") {
  const box = document.getElementById(kind === "error" ? "banner" : "notice");
  if (!box) return;
  box.textContent = message;
  box.hidden = !message;
  if (kind !== "error") {
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => (box.hidden = true), 15000);
  }
}

export function clearBanner() {
  banner("", "error");
}

/** Run `load` now and every `ms` (one at a time); an error goes to the banner, the next
 * success clears it. `now()` runs it at once (after the one in flight, if any). */
export function every(ms, load) {
  let timer = null;
  let busy = false;
  let again = false;
  const tick = async () => {
    clearTimeout(timer);
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    try {
      await load();
      clearBanner();
      document.body.dataset.ready = "1";
    } catch (err) {
      banner(err.message || String(err));
      if (err.status === 401) {
        busy = false;
        return; // not signed in: asking again would not help, the banner says what does
      }
    }
    busy = false;
    if (again) {
      again = false;
      tick();
    } else if (ms) {
      timer = setTimeout(tick, ms);
    }
  };
  tick();
  return { now: tick };
}

// --- formatting ----------------------------------------------------------------------

/** "$1.2345" from a decimal string: up to 4 decimals for small amounts, 2 from $100. */
export function usd(value) {
  if (value === null || value === undefined || value === "" || value === "-") return "—";
  const n = Number(value);
  if (!Number.isFinite(n)) return String(value);
  if (n === 0) return "$0";
  if (Math.abs(n) < 1) {
    // four significant digits: small amounts (a call costs fractions of a cent) stay readable
    const fixed = Number(n.toPrecision(4)).toFixed(Math.min(14, 3 - Math.floor(Math.log10(Math.abs(n)))));
    let [whole, frac = ""] = fixed.split(".");
    frac = frac.replace(/0+$/, "").padEnd(2, "0");
    return `$${whole}.${frac}`;
  }
  return `$${n.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 4 })}`;
}

export function count(n) {
  if (n === null || n === undefined) return "—";
  return Number(n).toLocaleString("en-US");
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB"];
  let v = Number(n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

export function ms(n) {
  if (n === null || n === undefined) return "—";
  const v = Number(n);
  return v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${Math.round(v)} ms`;
}

/** "12 s ago" / "in 3 min" from an ISO instant. */
export function relative(iso, now = Date.now()) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return iso || "—";
  const d = Math.round((t - now) / 1000);
  const a = Math.abs(d);
  let text;
  if (a < 5) return d <= 0 ? "just now" : "in a moment";
  if (a < 60) text = `${a} s`;
  else if (a < 3600) text = `${Math.round(a / 60)} min`;
  else if (a < 86400) text = `${Math.round(a / 3600)} h`;
  else text = `${Math.round(a / 86400)} d`;
  return d < 0 ? `${text} ago` : `in ${text}`;
}

/** A <time> showing the relative time, with the ISO instant as its title; `tick()` keeps it fresh. */
export function time(iso) {
  if (!iso) return el("span", { class: "muted" }, "—");
  return el("time", { datetime: iso, title: iso }, relative(iso));
}

/** Refresh every <time datetime> on the page (relative times drift). */
export function tick() {
  const now = Date.now();
  for (const t of document.querySelectorAll("time[datetime]")) t.textContent = relative(t.dateTime, now);
}
setInterval(tick, 5000);

const CHIP = {
  allow: "allow",
  deny: "deny",
  error: "error",
  "would-deny": "would",
  "would-escalate": "would",
  escalate: "pending",
  pending: "pending",
  approved: "allow",
  denied: "deny",
  expired: "error",
  revoked: "deny",
  active: "allow",
};

/** A decision (or status) as a coloured chip; an event row is grey and names what happened. */
export function chip(decision, kind) {
  if (kind === "event") return el("span", { class: "chip event", title: `event (${decision})` }, "event");
  const cls = CHIP[decision] || "event";
  return el("span", { class: `chip ${cls}` }, decision || "—");
}

/** The text of a cell that may be empty. */
export function text(value) {
  return value === null || value === undefined || value === "" ? "—" : String(value);
}

/** The query string of a form's filled fields. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

/** An empty-state row spanning a table. */
export function emptyRow(columns, message) {
  return el("tr", { class: "empty" }, el("td", { colspan: columns }, message));
}

/** Colours for the charts' series (calm, distinguishable). */
export const PALETTE = ["#4c78a8", "#59a14f", "#e0a040", "#b07aa1", "#76b7b2", "#e15759", "#9c755f", "#edc948", "#bab0ac", "#ff9da7"];

// --- charts (uPlot, vendored) ------------------------------------------------------------

/**
 * Stacked bars over time in `box` (uPlot). `step` is the bucket in seconds; `buckets` the
 * ISO starts of the buckets that have data; `layers` [{label, values (one per bucket)}],
 * bottom first; `fmt` formats a value (axis and legend). The range runs from `since` to now
 * on a regular grid anchored at the data. Returns a redraw function for resizes.
 */
export function stackedBars(box, { since, step, buckets, layers, fmt, legendFmt = fmt, colors = PALETTE }) {
  box.replaceChildren();
  if (typeof uPlot === "undefined") {
    box.append(el("p", { class: "emptystate" }, "The chart library did not load (static/vendor/uPlot.iife.min.js)."));
    return () => {};
  }
  const times = buckets.map((b) => Date.parse(b) / 1000);
  const now = Date.now() / 1000;
  const anchor = times.length ? times[0] : Math.floor(now / step) * step;
  let start = anchor;
  const from = since ? Date.parse(since) / 1000 : anchor;
  while (start - step > from - step && start - step > anchor - 1000 * step) start -= step;
  const xs = [];
  for (let t = start; t <= Math.max(now, times[times.length - 1] || now) && xs.length < 2000; t += step) xs.push(t);
  const index = (t) => Math.max(0, Math.min(xs.length - 1, Math.round((t - start) / step)));
  const raw = layers.map((layer) => {
    const values = new Array(xs.length).fill(0);
    layer.values.forEach((v, i) => {
      values[index(times[i])] += v;
    });
    return values;
  });
  const stacked = raw.map((_, i) => xs.map((__, j) => raw.slice(0, i + 1).reduce((s, r) => s + r[j], 0)));
  const order = layers.map((_, i) => i).reverse(); // the top layer first: the lower ones paint over it
  const bars = uPlot.paths.bars({ size: [0.82, 48], align: 1 });
  const label = (x) => {
    if (step >= 86400) return new Date((x + step / 2) * 1000).toLocaleDateString("en-US", { month: "short", day: "numeric", timeZone: "UTC" });
    const d = new Date(x * 1000);
    const hh = `${String(d.getHours()).padStart(2, "0")}:00`;
    return d.getHours() === 0 ? `${d.toLocaleDateString("en-US", { month: "short", day: "numeric" })} ${hh}` : hh;
  };
  const splits = (u) => {
    const room = Math.max(2, Math.floor((u.bbox.width / (window.devicePixelRatio || 1)) / 80));
    const nice = step >= 86400 ? [1, 2, 7, 14, 30] : [1, 2, 3, 6, 12, 24, 48, 168];
    const every = nice.find((k) => Math.ceil(xs.length / k) <= room) || Math.ceil(xs.length / room);
    return xs.filter((x) => (step >= 86400 ? Math.round((x - start) / step) % every === 0 : Math.round(x / step) % every === 0));
  };
  const opts = {
    width: box.clientWidth || 800,
    height: box.classList.contains("short") ? 200 : 280,
    cursor: { points: { show: false } },
    scales: { x: { time: true, range: () => [start, xs[xs.length - 1] + step] }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.12 : 1] } },
    axes: [
      { stroke: "#67727e", grid: { show: false }, ticks: { stroke: "#e3e7ec" }, splits, values: (u, vals) => vals.map(label) },
      { stroke: "#67727e", size: 72, grid: { stroke: "#eef1f4" }, ticks: { show: false }, values: (u, vals) => vals.map((v) => fmt(v)) },
    ],
    legend: { live: true },
    series: [
      { label: step >= 86400 ? "Day" : "Hour", value: (u, v) => (v === null ? "whole range" : step >= 86400 ? label(v) : `${new Date(v * 1000).toLocaleDateString("en-US", { month: "short", day: "numeric" })} ${label(v).slice(-5)}`) },
      ...order.map((i) => ({
        label: layers[i].label,
        stroke: colors[i % colors.length],
        fill: colors[i % colors.length],
        width: 0,
        paths: bars,
        points: { show: false },
        value: (u, v, si, idx) => legendFmt(idx === null || idx === undefined ? raw[i].reduce((a, b) => a + b, 0) : raw[i][idx]),
      })),
    ],
  };
  const chart = new uPlot(opts, [xs, ...order.map((i) => stacked[i])], box);
  return () => chart.setSize({ width: box.clientWidth || 800, height: opts.height });
}

// --- the nav's pending-approvals badge -----------------------------------------------------

/** Show how many requests wait for an answer beside "Approvals" in the nav. */
export function pendingBadge(n) {
  const link = document.querySelector('header nav a[href="/approvals"]');
  if (!link) return;
  let badge = link.querySelector(".badge");
  if (!n) {
    if (badge) badge.remove();
    return;
  }
  if (!badge) {
    badge = el("span", { class: "badge", title: "requests waiting for an answer" });
    link.append(badge);
  }
  badge.textContent = String(n);
}

if (!signedIn) {
  banner(SIGN_IN); // and nothing else: each page's first call stops at the missing token
} else if (document.body && document.body.dataset.page !== "approvals") {
  const poll = async () => {
    try {
      pendingBadge((await api("/api/approvals?history=0")).length);
    } catch (err) {
      if (err.status === 401) return; // the page's own calls report it
    }
    setTimeout(poll, 3000);
  };
  poll();
}
