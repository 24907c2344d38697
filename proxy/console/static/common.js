// Shared by every console page: the API call (cookie + CSRF header), the error banner,
// DOM building (text only: a value from the API never becomes markup), and formatting.

const csrfMeta = document.querySelector('meta[name="csrf"]');

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

/** Call the console's API: GET (no body) or POST a JSON body with the CSRF header. */
export async function api(path, body) {
  const init = { credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.headers["X-CSRF-Token"] = csrfMeta ? csrfMeta.content : "";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "the console does not answer: is `egress-guard console` still running?");
  }
  if (!response.ok) {
    let message = response.statusText || `HTTP ${response.status}`;
    try {
      const data = await response.json();
      message = data.error || data.message || message;
    } catch (err) {
      /* not JSON: keep the status text */
    }
    if (response.status === 401) {
      message = "Not signed in (or the console restarted): open the URL the console printed at start (http://127.0.0.1:…/?token=…).";
    }
    throw new ApiError(response.status, message);
  }
  return response.json();
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

if (document.body && document.body.dataset.page !== "approvals") {
  const poll = async () => {
    try {
      pendingBadge((await api("/api/approvals?history=0")).length);
    } catch (err) {
      /* the page's own calls report errors */
    }
    setTimeout(poll, 3000);
  };
  poll();
}
