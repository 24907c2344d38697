// Spend: USD per agent or per model over time (stacked, day or hour), per-model and per-agent totals,
// the budgets as spent / reserved / remaining bars, and the sessions that spent most.
import { PALETTE, api, count, el, emptyRow, every, query, stackedBars, text, time, usd } from "/static/common.js";

const form = document.getElementById("range");
const chartBox = document.getElementById("spend-chart");
const chartEmpty = document.getElementById("spend-chart-empty");
const params = new URLSearchParams(location.search);
let bucket = params.get("bucket") === "hour" ? "hour" : "day";
let split = params.get("by") === "model" ? "model" : "agent"; // what the chart's layers are
if (params.get("since")) form.elements.since.value = params.get("since");
let redraw = () => {};

function setBucket(value) {
  bucket = value;
  for (const b of form.querySelectorAll("button[data-bucket]")) b.setAttribute("aria-pressed", String(b.dataset.bucket === bucket));
}
setBucket(bucket);

function setSplit(value) {
  split = value;
  for (const b of form.querySelectorAll("button[data-split]")) b.setAttribute("aria-pressed", String(b.dataset.split === split));
  document.getElementById("spend-chart-title").textContent = `USD per ${split} over time`;
}
setSplit(split);

function axisUsd(v) {
  if (v === 0) return "$0";
  return Math.abs(v) < 0.01 ? `$${Number(v.toPrecision(2))}` : usd(v);
}

function totals(table, map, label) {
  const entries = Object.entries(map || {});
  const max = Math.max(0, ...entries.map(([, v]) => Number(v)));
  document.querySelector(`${table} tbody`).replaceChildren(
    ...(entries.length
      ? entries.map(([name, v]) =>
          el(
            "tr",
            {},
            el("td", {}, name, el("div", { class: "bar" }, share(Number(v), max))),
            el("td", { class: "num", title: `${v} USD` }, usd(v)),
          ),
        )
      : [emptyRow(2, `No ${label} spent anything in this range.`)]),
  );
}

function share(v, max) {
  const span = el("span", { class: "spendbar" });
  span.style.width = `${max > 0 ? Math.max(1, (100 * v) / max) : 0}%`;
  return span;
}

let names = []; // every agent seen, sorted: its colour is its place (stable across ranges)

function chart(data, since) {
  const buckets = [...new Set(data.series.map((s) => s.bucket))].sort();
  // the biggest on top of the stack; an agent keeps its colour across ranges, a model its place
  const agents = Object.keys((split === "model" ? data.by_model : data.by_agent) || {}).reverse();
  if (!buckets.length) {
    chartBox.hidden = true;
    chartEmpty.hidden = false;
    redraw = () => {};
    return;
  }
  chartBox.hidden = false;
  chartEmpty.hidden = true;
  const at = new Map(buckets.map((b, i) => [b, i]));
  const layers = agents.map((agent) => ({ label: agent, values: new Array(buckets.length).fill(0) }));
  const of = new Map(agents.map((a, i) => [a, layers[i]]));
  for (const s of data.series) {
    const key = s[split];
    const layer = of.get(key) || of.get(key || "-");
    if (layer) layer.values[at.get(s.bucket)] += Number(s.usd);
  }
  const order = split === "model" ? [...agents].sort() : names;
  const colors = agents.map((a) => PALETTE[Math.max(0, order.indexOf(a)) % PALETTE.length]);
  redraw = stackedBars(chartBox, { since, step: bucket === "hour" ? 3600 : 86400, buckets, layers, fmt: axisUsd, legendFmt: usd, colors });
}

function budgetCard(b) {
  const limited = b.limit_usd !== "-" && b.limit_usd !== null;
  const spent = Number(b.spent_usd);
  const reserved = Number(b.reserved_usd);
  const limit = limited ? Number(b.limit_usd) : 0;
  const meter = el("div", { class: `meter${limited ? "" : " nolimit"}${limited && spent >= limit ? " over" : ""}` });
  if (limited && limit > 0) {
    const s = el("span", { class: "spent", title: `spent ${b.spent_usd} USD` });
    s.style.width = `${Math.min(100, (100 * spent) / limit)}%`;
    const r = el("span", { class: "reserved", title: `reserved ${b.reserved_usd} USD (calls in flight)` });
    r.style.width = `${Math.max(0, Math.min(100 - (100 * spent) / limit, (100 * reserved) / limit))}%`;
    meter.append(s, r);
  }
  const scope = b.scope === "day" ? `day ${b.key}` : b.scope === "session" ? `session ${b.key}` : "total";
  let resets = text(b.resets_at);
  if (!Number.isNaN(Date.parse(b.resets_at))) resets = el("span", {}, "resets ", time(b.resets_at));
  else if (b.resets_at === "never") resets = "never resets";
  else if (b.resets_at === "new session") resets = "resets with a new session";
  return el(
    "div",
    { class: "budget", dataset: { agent: b.agent, scope: b.scope } },
    el(
      "div",
      { class: "head" },
      el("span", {}, el("span", { class: "name" }, b.agent), el("span", { class: "scope" }, scope)),
      el("span", { class: "amounts" }, usd(b.spent_usd), el("span", { class: "muted" }, limited ? ` of ${usd(b.limit_usd)}` : " · no limit")),
    ),
    meter,
    el(
      "div",
      { class: "legend" },
      el("span", { class: "item", title: `${b.spent_usd} USD` }, el("span", { class: "swatch spent" }), `spent ${usd(b.spent_usd)}`),
      el("span", { class: "item", title: `${b.reserved_usd} USD: calls in flight` }, el("span", { class: "swatch reserved" }), `reserved ${usd(b.reserved_usd)}`),
      limited ? el("span", { class: "item", title: `${b.remaining_usd} USD` }, el("span", { class: "swatch remaining" }), `remaining ${usd(b.remaining_usd)}`) : null,
      el("span", { class: "item resets" }, resets),
    ),
  );
}

const SCOPES = { day: 0, total: 1, session: 2 };

async function load() {
  const since = form.elements.since.value;
  history.replaceState(null, "", `/spend${query({ since, bucket, by: split })}`);
  const [data, budgets, top] = await Promise.all([
    api(`/api/spend${query({ since, bucket })}`),
    api("/api/budgets"),
    api(`/api/sessions/top${query({ since, limit: 10 })}`),
  ]);
  const total = document.getElementById("spend-total");
  total.textContent = data.total;
  total.dataset.usd = data.total;
  total.title = `${data.total} USD`;
  const sinceText = document.getElementById("spend-since");
  sinceText.replaceChildren(data.since ? el("span", {}, "since ", time(data.since)) : "all time");
  document.getElementById("spend-agents").textContent = count(Object.keys(data.by_agent || {}).length);
  document.getElementById("spend-models").textContent = count(Object.keys(data.by_model || {}).length);
  names = [...new Set([...budgets.map((b) => b.agent), ...Object.keys(data.by_agent || {})])].sort();
  chart(data, data.since);
  totals("#by-model", data.by_model, "model");
  totals("#by-agent", data.by_agent, "agent");
  const sorted = [...budgets].sort(
    (a, b) =>
      (b.limit_usd !== "-") - (a.limit_usd !== "-") || a.agent.localeCompare(b.agent) || SCOPES[a.scope] - SCOPES[b.scope] || a.key.localeCompare(b.key),
  );
  const box = document.getElementById("budgets");
  const limited = sorted.filter((b) => b.limit_usd !== "-");
  const open = sorted.filter((b) => b.limit_usd === "-");
  const wasOpen = box.querySelector("details")?.open;
  box.replaceChildren(
    ...(limited.length
      ? limited.map(budgetCard)
      : [el("p", { class: "emptystate" }, sorted.length ? "No budget has a limit. Set one under an agent's limits: budget_usd: {day: 20} in the config, or egress-guard budget set." : "No agents in the config.")]),
  );
  if (open.length) {
    const details = el(
      "details",
      { class: "unlimited" },
      el("summary", {}, `${count(open.length)} budget${open.length === 1 ? "" : "s"} without a limit`),
      el(
        "table",
        { class: "grid compact" },
        el("thead", {}, el("tr", {}, el("th", {}, "Agent"), el("th", {}, "Scope"), el("th", { class: "num" }, "Spent"), el("th", { class: "num" }, "Reserved"))),
        el(
          "tbody",
          {},
          ...open.map((b) =>
            el(
              "tr",
              { dataset: { agent: b.agent, scope: b.scope } },
              el("td", {}, b.agent),
              el("td", {}, b.scope === "day" ? `day ${b.key}` : b.scope === "session" ? `session ${b.key}` : "total"),
              el("td", { class: "num", title: `${b.spent_usd} USD` }, usd(b.spent_usd)),
              el("td", { class: "num", title: `${b.reserved_usd} USD` }, usd(b.reserved_usd)),
            ),
          ),
        ),
      ),
    );
    details.open = Boolean(wasOpen);
    box.append(details);
  }
  document.querySelector("#top-sessions tbody").replaceChildren(
    ...(top.length
      ? top.map((s) =>
          el(
            "tr",
            {},
            el("td", {}, s.agent),
            el("td", {}, s.session || el("span", { class: "muted" }, "(no session)")),
            el("td", { class: "num" }, count(s.requests)),
            el("td", { class: "num", title: `${s.usd} USD` }, usd(s.usd)),
            el("td", { class: "when" }, time(s.last)),
          ),
        )
      : [emptyRow(5, "No priced calls in this range.")]),
  );
}

const timer = every(15000, load);
form.addEventListener("change", () => timer.now());
for (const b of form.querySelectorAll("button[data-split]")) {
  b.addEventListener("click", () => {
    setSplit(b.dataset.split);
    timer.now();
  });
}
for (const b of form.querySelectorAll("button[data-bucket]")) {
  b.addEventListener("click", () => {
    setBucket(b.dataset.bucket);
    timer.now();
  });
}
let resizing = null;
window.addEventListener("resize", () => {
  clearTimeout(resizing);
  resizing = setTimeout(() => redraw(), 150);
});
