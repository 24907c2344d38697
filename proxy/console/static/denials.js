// Denials: the refusals flagged as possible exfiltration first (a red band), then counts by
// reason and by host, and the refusals over time.
import { api, count, el, emptyRow, every, query, stackedBars, text, time } from "/static/common.js";

const form = document.getElementById("range");
const chartBox = document.getElementById("denials-chart");
const chartEmpty = document.getElementById("denials-chart-empty");
const params = new URLSearchParams(location.search);
let bucket = params.get("bucket") === "day" ? "day" : "hour";
if (params.get("since")) form.elements.since.value = params.get("since");
let redraw = () => {};

function setBucket(value) {
  bucket = value;
  for (const b of form.querySelectorAll("button[data-bucket]")) b.setAttribute("aria-pressed", String(b.dataset.bucket === bucket));
}
setBucket(bucket);

function request(r) {
  const dflt = (r.scheme === "https" && r.port === 443) || (r.scheme === "http" && r.port === 80);
  const host = r.host ? (r.port && !dflt ? `${r.host}:${r.port}` : r.host) : "—";
  return `${r.method || ""} ${host}${r.path || ""}`.trim();
}

function counts(table, items, key, what) {
  const max = Math.max(0, ...items.map((i) => i.count));
  document.querySelector(`${table} tbody`).replaceChildren(
    ...(items.length
      ? items.map((i) => {
          const bar = el("span");
          bar.style.width = `${max ? Math.max(1, (100 * i.count) / max) : 0}%`;
          return el("tr", {}, el("td", {}, el("div", { class: "label" }, i[key]), el("div", { class: "bar" }, bar)), el("td", { class: "num" }, count(i.count)));
        })
      : [emptyRow(2, `No refusals, so no ${what}.`)]),
  );
}

async function load() {
  const since = form.elements.since.value;
  history.replaceState(null, "", `/denials${query({ since, bucket })}`);
  const data = await api(`/api/denials${query({ since, bucket })}`);
  const flagged = data.flagged || [];
  const box = document.getElementById("flagged");
  box.classList.toggle("none", !flagged.length);
  box.querySelector("h2").textContent = flagged.length
    ? `Flagged: ${flagged.length === 50 ? "50+" : flagged.length} possible exfiltration attempt${flagged.length === 1 ? "" : "s"}`
    : "Flagged: none";
  box.querySelector("tbody").replaceChildren(
    ...(flagged.length
      ? flagged.map((r) =>
          el(
            "tr",
            { dataset: { id: r.id } },
            el("td", { class: "when" }, time(r.ts)),
            el("td", {}, text(r.agent), r.session ? el("div", { class: "muted" }, r.session) : null),
            el("td", {}, el("span", { class: "chip flag" }, text(r.credential))),
            el("td", { class: "request mono" }, el("div", { class: "line", title: request(r) }, request(r))),
            el("td", { class: "reason" }, text(r.reason)),
          ),
        )
      : [emptyRow(5, "Nothing flagged in this range. A forged key, another service's key or a key sent to a host it is not bound to would be listed here first.")]),
  );
  const series = data.series || [];
  if (!series.length) {
    chartBox.hidden = true;
    chartEmpty.hidden = false;
    redraw = () => {};
  } else {
    chartBox.hidden = false;
    chartEmpty.hidden = true;
    redraw = stackedBars(chartBox, {
      since: data.since,
      step: bucket === "hour" ? 3600 : 86400,
      buckets: series.map((s) => s.bucket),
      layers: [{ label: "refusals", values: series.map((s) => s.count) }],
      fmt: (v) => count(Math.round(v)),
      colors: ["#d9655b"],
    });
  }
  counts("#by-reason", data.by_reason || [], "reason", "reasons");
  counts("#by-host", data.by_host || [], "host", "hosts");
  const total = data.total ?? series.reduce((s, x) => s + x.count, 0);
  document.getElementById("denials-total").replaceChildren(count(total), el("span", { class: "muted" }, ` refusal${total === 1 ? "" : "s"}`));
}

const timer = every(10000, load);
form.addEventListener("change", () => timer.now());
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
