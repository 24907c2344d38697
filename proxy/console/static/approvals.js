// Approvals: the held requests (refreshed every second, cards kept in place so a note being
// typed survives), the answer buttons, and the history (approvals, grants, freezes).
import { api, banner, chip, clearBanner, el, emptyRow, every, pendingBadge, relative, text, time } from "/static/common.js";

const pendingBox = document.getElementById("pending");
const cards = new Map(); // approval id -> card element

function target(a) {
  const dflt = (a.scheme === "https" && a.port === 443) || (a.scheme === "http" && a.port === 80);
  const host = a.port && !dflt ? `${a.host}:${a.port}` : a.host;
  return `${a.method || ""} ${a.scheme ? `${a.scheme}://` : ""}${host}${a.path || ""}`.trim();
}

function expiresText(iso) {
  const left = Math.round((Date.parse(iso) - Date.now()) / 1000);
  if (Number.isNaN(left)) return iso;
  if (left <= 0) return "expiring now";
  if (left < 120) return `expires in ${left} s`;
  return `expires ${relative(iso)}`;
}

/** Why a scope cannot be given to this request (null: it can). The server refuses the same
 * (escalation.scope_problem): a grant for a request that named no agent would cover every agent. */
function scopeProblem(a, scope) {
  if (scope === "session" || scope === "always") {
    if (!a.agent) return "This request named no agent: it can be approved once only";
    if (scope === "session" && !a.session) return "This request has no session";
  }
  return null;
}

function enableButtons(card, a) {
  for (const b of card.querySelectorAll("button")) b.disabled = Boolean(scopeProblem(a, b.dataset.scope));
}

async function answer(card, a, action, scope) {
  const note = card.querySelector("textarea[name=note]").value.trim();
  const buttons = card.querySelectorAll("button");
  for (const b of buttons) b.disabled = true;
  const body = action === "approve" ? { scope, note } : { note };
  try {
    await api(`/api/approvals/${encodeURIComponent(a.id)}/${action}`, body);
    card.classList.add("done");
    banner(action === "approve" ? `Approved ${a.id.slice(0, 8)} (${scope}): ${target(a)}` : `Denied ${a.id.slice(0, 8)}: ${target(a)}`, "ok");
    clearBanner();
    pending.now();
    past.now();
  } catch (err) {
    banner(err.message);
    enableButtons(card, a);
  }
}

function cardFor(a) {
  const card = el("article", { class: "approval", dataset: { id: a.id } });
  const expires = el("span", { class: "expires", title: a.expires }, expiresText(a.expires));
  const button = (label, cls, action, scope, title) =>
    el("button", { type: "button", class: cls, dataset: scope ? { action, scope } : { action }, title, onclick: () => answer(card, a, action, scope) }, label);
  const scoped = (label, scope, title) => {
    const b = button(label, "secondary", "approve", scope, scopeProblem(a, scope) || title);
    b.disabled = Boolean(scopeProblem(a, scope));
    return b;
  };
  card.append(
    el(
      "div",
      { class: "top-line" },
      el("span", { class: "who" }, text(a.agent), a.session ? el("span", { class: "session" }, ` · session ${a.session}`) : null),
      el("span", { class: "chips" }, chip("pending"), el("span", { class: "id", title: a.id }, a.id.slice(0, 8))),
    ),
    el("div", { class: "req" }, target(a)),
    el(
      "dl",
      { class: "facts" },
      el("dt", {}, "rule"),
      el("dd", { class: "mono" }, text(a.rule)),
      el("dt", {}, "why"),
      el("dd", {}, text(a.reason)),
      el("dt", {}, "asked"),
      el("dd", {}, time(a.created), a.replica && a.replica !== "local" ? ` on ${a.replica}` : ""),
      el("dt", {}, "expires"),
      el("dd", {}, expires),
    ),
    el("textarea", { name: "note", rows: 2, placeholder: "Note (optional): why. Kept in the audit log and told to the agent." }),
    el(
      "div",
      { class: "buttons" },
      button("Approve once", "primary", "approve", "once", "Only this request"),
      scoped("Approve session", "session", `Also this agent's later requests in session ${a.session} that the same rule would escalate`),
      scoped("Approve always", "always", "This agent's requests in any session that the same rule would escalate (a stored grant)"),
      el("span", { class: "spacer" }),
      button("Deny", "danger-outline", "deny", null, "Refuse it: the agent gets the note"),
    ),
  );
  card._expires = expires;
  return card;
}

async function loadPending() {
  const list = await api("/api/approvals?history=0");
  const ids = new Set(list.map((a) => a.id));
  for (const [id, card] of cards) {
    if (!ids.has(id)) {
      card.remove();
      cards.delete(id);
    }
  }
  for (const a of list) {
    let card = cards.get(a.id);
    if (!card) {
      card = cardFor(a);
      cards.set(a.id, card);
      pendingBox.append(card);
    }
    card._expires.textContent = expiresText(a.expires);
    card._expires.classList.toggle("soon", Date.parse(a.expires) - Date.now() < 30000);
  }
  const empty = pendingBox.querySelector(".emptystate");
  if (!list.length && !empty) {
    pendingBox.append(
      el("p", { class: "emptystate" }, "No pending approvals. A request that a rule escalates waits here (until escalation.timeout) for you to approve or deny it."),
    );
  } else if (list.length && empty) {
    empty.remove();
  }
  pendingBadge(list.length);
  document.title = list.length ? `(${list.length}) Approvals · egress-guard console` : "Approvals · egress-guard console";
}

function answered(a) {
  if (!a.decided_by) return el("span", { class: "muted" }, "—");
  return el("span", {}, a.decided_by, " ", a.decided_at ? time(a.decided_at) : null);
}

async function loadHistory() {
  const data = await api("/api/approvals?history=1");
  const approvals = [...(data.approvals || [])].reverse();
  const tbody = document.querySelector("#history tbody");
  tbody.replaceChildren(
    ...(approvals.length
      ? approvals.map((a) =>
          el(
            "tr",
            { dataset: { id: a.id } },
            el("td", { class: "when" }, time(a.created)),
            el("td", {}, chip(a.status)),
            el("td", {}, text(a.agent), a.session ? el("div", { class: "muted" }, a.session) : null),
            el("td", { class: "request mono" }, target(a)),
            el("td", { class: "mono nowrap" }, text(a.rule)),
            el("td", {}, answered(a)),
            el("td", {}, text(a.scope)),
            el("td", { class: "reason" }, text(a.note)),
          ),
        )
      : [emptyRow(8, "No escalations yet.")]),
  );
  const grants = [...(data.grants || [])].reverse();
  document.querySelector("#grants tbody").replaceChildren(
    ...(grants.length
      ? grants.map((g) =>
          el(
            "tr",
            { class: g.revoked ? "revoked" : null },
            el("td", { class: "num" }, g.id),
            el("td", {}, g.revoked ? el("span", { class: "chip deny", title: g.revoked }, "revoked") : chip("active")),
            el("td", {}, text(g.agent ?? "any")),
            el("td", {}, text(g.session ?? "any")),
            el("td", {}, g.host === "*" ? "every host" : `${g.host}:${g.port}`),
            el("td", { class: "mono" }, text(g.rule)),
            el("td", {}, text(g.by)),
            el("td", { class: "when" }, time(g.created)),
          ),
        )
      : [emptyRow(8, "No grants. Approving with scope session or always adds one; `egress-guard revoke-grant ID` ends it.")]),
  );
  const freezes = [...(data.freezes || [])].reverse();
  document.querySelector("#freezes tbody").replaceChildren(
    ...(freezes.length
      ? freezes.map((f) =>
          el(
            "tr",
            {},
            el("td", {}, f.lifted ? el("span", { class: "chip plain", title: `lifted ${f.lifted} by ${f.lifted_by || "?"}` }, "lifted") : el("span", { class: "chip deny" }, "frozen")),
            el("td", {}, text(f.agent)),
            el("td", {}, f.session || el("span", { class: "muted" }, "(no session)")),
            el("td", { class: "reason" }, text(f.trigger)),
            el("td", { class: "when" }, time(f.created)),
          ),
        )
      : [emptyRow(5, "No frozen sessions.")]),
  );
}

const state = document.getElementById("approvals-state");
const pending = every(1000, async () => {
  try {
    await loadPending();
    state.className = "state live";
  } catch (err) {
    state.className = "state down";
    throw err;
  }
});
const past = every(5000, loadHistory);
