// Agents: each agent's keys (ids and state: the store holds no key), live and frozen
// sessions, what it spent today, and the kill switch (with a confirm dialog).
import { api, banner, clearBanner, count, el, emptyRow, every, text, time, usd } from "/static/common.js";

const KEYS_SHOWN = 8;
const list = document.getElementById("agents");
const dialog = document.getElementById("confirm-kill");
const sessionSelect = dialog.querySelector("select[name=session]");
let killing = null; // the agent the dialog is for

function statusChip(k) {
  if (k.status === "active") return el("span", { class: "chip allow" }, "active");
  if (k.revoked) return el("span", { class: "chip deny", title: k.revoked_reason || "revoked" }, "revoked");
  return el("span", { class: "chip event", title: k.expires ? `expired ${k.expires}` : null }, text(k.status));
}

function card(a) {
  const keys = a.keys || [];
  const shown = keys.slice(0, KEYS_SHOWN);
  const more = (a.keys_total ?? keys.length) - shown.length;
  return el(
    "article",
    { class: "agent", dataset: { agent: a.agent } },
    el(
      "div",
      { class: "head" },
      el("div", {}, el("div", { class: "name" }, a.agent), a.configured === false ? el("span", { class: "chip error", title: "it has keys in the store but is not in the config" }, "not in the config") : null),
      el("div", { class: "today" }, el("span", { class: "label" }, "spent today"), el("span", { class: "value", title: `${a.spent_today} USD` }, usd(a.spent_today))),
    ),
    el(
      "div",
      { class: "meta" },
      "services",
      ...(a.services.length ? a.services.map((s) => el("span", { class: "chip plain" }, s)) : [el("span", { class: "muted" }, "none")]),
    ),
    el(
      "div",
      { class: "meta" },
      `${count((a.sessions || []).length)} live session${(a.sessions || []).length === 1 ? "" : "s"}`,
      ...(a.sessions || []).map((s) => el("span", { class: "chip allow" }, s || "(no session)")),
      ...(a.frozen || []).map((s) => el("span", { class: "chip deny", title: "frozen: diverged from its baseline (see Approvals)" }, `frozen ${s || "(no session)"}`)),
    ),
    el(
      "table",
      { class: "grid compact keys" },
      el("thead", {}, el("tr", {}, el("th", {}, "Key id"), el("th", {}, "Session"), el("th", {}, "Created"), el("th", {}, "Expires"), el("th", {}, "State"))),
      el(
        "tbody",
        {},
        ...(shown.length
          ? shown.map((k) =>
              el(
                "tr",
                { class: k.revoked ? "revoked" : null, dataset: { key: k.key_id } },
                el("td", {}, el("span", { class: "key-id" }, k.key_id)),
                el("td", {}, text(k.session)),
                el("td", { class: "when" }, time(k.created)),
                el("td", { class: "when" }, k.expires ? time(k.expires) : "never"),
                el("td", {}, statusChip(k)),
              ),
            )
          : [emptyRow(5, `No keys. Mint one: egress-guard keys mint ${a.agent}`)]),
      ),
    ),
    more > 0 ? el("div", { class: "muted" }, `and ${count(more)} older key${more === 1 ? "" : "s"}: egress-guard keys list --agent ${a.agent} --all`) : null,
    el(
      "div",
      { class: "foot" },
      el("button", { type: "button", class: "danger-outline", dataset: { action: "kill" }, onclick: () => ask(a) }, "Kill…"),
    ),
  );
}

function ask(a) {
  killing = a.agent;
  document.getElementById("kill-agent").textContent = a.agent;
  sessionSelect.replaceChildren(
    el("option", { value: "" }, "every session (all its keys)"),
    ...(a.sessions || []).filter((s) => s).map((s) => el("option", { value: s }, `only session ${s}`)),
  );
  dialog.showModal();
}

async function kill() {
  const agent = killing;
  const session = sessionSelect.value;
  const confirmButton = dialog.querySelector("button[data-action=confirm]");
  confirmButton.disabled = true;
  try {
    const done = await api(`/api/agents/${encodeURIComponent(agent)}/kill`, session ? { session } : {});
    dialog.close();
    clearBanner();
    const containers = done.containers || {};
    const killed = (containers.killed || []).length;
    banner(
      `Killed ${agent}${session ? ` (session ${session})` : ""}: ${count(done.revoked_keys)} key${done.revoked_keys === 1 ? "" : "s"} revoked` +
        (killed ? `, ${killed} container${killed === 1 ? "" : "s"} killed` : "") +
        ". A running proxy cuts its connections within a second.",
      "ok",
    );
    if (done.problems && done.problems.length) banner(done.problems.join("; "));
    timer.now();
  } catch (err) {
    dialog.close();
    banner(err.message);
  } finally {
    confirmButton.disabled = false;
  }
}

dialog.querySelector("button[data-action=confirm]").addEventListener("click", kill);
dialog.querySelector("button[data-action=cancel]").addEventListener("click", () => dialog.close());

async function load() {
  const agents = await api("/api/agents");
  list.replaceChildren(
    ...(agents.length
      ? agents.map(card)
      : [el("p", { class: "emptystate" }, "No agents. Add one under agents: in the config, then mint it a key: egress-guard keys mint NAME")]),
  );
}

const timer = every(5000, load);
