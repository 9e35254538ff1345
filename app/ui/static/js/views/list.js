// Jobs list: filters, cursor paging, live rows (SSE via fetch, polling fallback), compare selection.
import { api } from "../api.js";
import { h, mount } from "../dom.js";
import {
  TERMINAL, duration, firstPerplexity, jobSeconds, meanAccuracy, modelName, num, params, pct, removedSummary, target,
} from "../format.js";
import { watchJob } from "../live.js";
import { beforeAfter, progressBar, statusBadge } from "../widgets.js";

const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];
const PAGE_SIZE = 20;
const REFRESH_MS = 10000;

export function listView(root, query) {
  const filters = { status: query.get("status") || "", method: query.get("method") || "", model: query.get("model") || "" };
  const cursors = [null]; // cursor of each page seen so far, for "previous"
  const selected = new Set();
  const watchers = new Map(); // job id -> stop()
  let page = 0;
  let nextCursor = null;
  let timer = null;
  let alive = true;

  const tbody = h("tbody", {});
  const statusLine = h("p", { class: "muted small", role: "status", "aria-live": "polite" });
  const compareButton = h("button", { type: "button", class: "primary", disabled: true, onclick: () => {
    location.hash = `#/compare?ids=${[...selected].join(",")}`;
  } }, "Compare selected");
  const prev = h("button", { type: "button", onclick: () => go(page - 1) }, "← Newer");
  const next = h("button", { type: "button", onclick: () => go(page + 1) }, "Older →");

  const methodSelect = h("select", { id: "f-method", name: "method" }, h("option", { value: "" }, "any"));
  const form = h("form", { class: "row", role: "search", "aria-label": "Filter jobs", onsubmit: (e) => { e.preventDefault(); apply(); } },
    h("div", { class: "field" }, h("label", { for: "f-status" }, "Status"),
      h("select", { id: "f-status", name: "status", onchange: apply }, h("option", { value: "" }, "any"),
        STATUSES.map((st) => h("option", { value: st, selected: filters.status === st }, st)))),
    h("div", { class: "field" }, h("label", { for: "f-method" }, "Method"), methodSelect),
    h("div", { class: "field", style: "min-width:240px;flex:1" }, h("label", { for: "f-model" }, "Model"),
      h("input", { id: "f-model", name: "model", value: filters.model, placeholder: "exact model id, e.g. builtin:smollm2-135m", list: "f-models" }),
      h("datalist", { id: "f-models" })),
    h("div", { class: "field" }, h("button", { type: "submit" }, "Filter")));
  methodSelect.addEventListener("change", apply);

  mount(root,
    h("div", { class: "row center" }, h("h1", {}, "Jobs"), h("span", { class: "spacer" }),
      h("a", { class: "button primary", href: "#/new" }, "New job")),
    h("section", { class: "panel", "aria-label": "Filters" }, form),
    h("section", { class: "panel" },
      h("div", { class: "table-wrap" }, h("table", { class: "jobs", "aria-label": "Jobs of this key's tenant" },
        h("thead", {}, h("tr", {},
          h("th", { scope: "col" }, h("span", { class: "sr-only" }, "Select")),
          ["Model / method", "Target", "Status", "Progress", "Duration", "Removed", "Parameters", "Perplexity", "Accuracy"]
            .map((c) => h("th", { scope: "col" }, c)))),
        tbody)),
      h("div", { class: "row" }, prev, next, h("span", { class: "spacer" }), compareButton),
      statusLine));

  api("/v1/methods").then(({ methods }) => {
    for (const m of methods) methodSelect.append(h("option", { value: m.name, selected: filters.method === m.name }, m.name));
  }).catch(() => {});
  api("/v1/models").then(({ models }) => {
    const list = root.querySelector("#f-models");
    for (const m of models) list.append(h("option", { value: m.id }));
  }).catch(() => {});

  function apply() {
    filters.status = form.querySelector("#f-status").value;
    filters.method = methodSelect.value;
    filters.model = form.querySelector("#f-model").value.trim();
    const q = new URLSearchParams(Object.entries(filters).filter(([, v]) => v));
    history.replaceState(null, "", `#/jobs${q.toString() ? `?${q}` : ""}`);
    cursors.length = 1;
    go(0);
  }

  async function go(target) {
    if (target < 0 || target >= cursors.length) return;
    page = target;
    await load();
  }

  async function load() {
    clearTimeout(timer);
    const q = new URLSearchParams({ limit: String(PAGE_SIZE) });
    for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
    if (cursors[page]) q.set("cursor", cursors[page]);
    try {
      const data = await api(`/v1/jobs?${q}`);
      if (!alive) return;
      nextCursor = data.next_cursor;
      if (nextCursor) cursors[page + 1] = nextCursor;
      render(data.items);
      statusLine.textContent = data.items.length
        ? `Page ${page + 1} · ${data.items.length} job(s) · updates live`
        : "No jobs match. Submit one with “New job”.";
    } catch (err) {
      statusLine.textContent = `Could not load jobs: ${err.detail || err.message}`;
    }
    prev.disabled = page === 0;
    next.disabled = !nextCursor;
    // New jobs (submitted elsewhere) appear on the first page without a manual refresh.
    if (alive) timer = setTimeout(load, REFRESH_MS);
  }

  function render(jobs) {
    const ids = new Set(jobs.map((j) => j.id));
    for (const [id, stop] of watchers) if (!ids.has(id)) { stop(); watchers.delete(id); }
    tbody.replaceChildren(...jobs.map(row));
    for (const job of jobs) {
      if (!TERMINAL.has(job.status) && !watchers.has(job.id)) {
        watchers.set(job.id, watchJob(job.id, (fresh) => update(fresh)));
      }
    }
  }

  function update(job) {
    const old = tbody.querySelector(`tr[data-job="${CSS.escape(job.id)}"]`);
    if (old) old.replaceWith(row(job));
    if (TERMINAL.has(job.status)) watchers.delete(job.id);
  }

  // One wrapper per cell, so the phone layout (label left, value right) has a single value box.
  const cell = (label, cls, ...content) => h("td", { "data-label": label, class: cls }, h("div", { class: "cell" }, ...content));

  function row(job) {
    const result = job.result || {};
    const ev = result.evaluation || {};
    const pplBefore = firstPerplexity(ev.before), pplAfter = firstPerplexity(ev.after);
    const box = h("input", { type: "checkbox", "aria-label": `select ${job.id} for comparison`, checked: selected.has(job.id),
      disabled: job.status !== "succeeded",
      onchange: (e) => {
        if (e.target.checked) selected.add(job.id); else selected.delete(job.id);
        compareButton.disabled = selected.size < 2;
      } });
    const pb = result.parameters_before?.total, pa = result.parameters_after?.total;
    return h("tr", { "data-job": job.id, "data-status": job.status },
      cell("Select", null, box),
      cell("Model / method", null,
        h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, `${modelName(job.model)} · ${job.method}`),
        h("div", { class: "id mono" }, job.id)),
      cell("Target", null, target(job)),
      cell("Status", null, statusBadge(job.status)),
      cell("Progress", null, progressBar(job)),
      cell("Duration", "num", duration(jobSeconds(job))),
      cell("Removed", null, removedSummary(job.result)),
      cell("Parameters", "num", pb ? `${params(pb)} → ${params(pa)}` : "–",
        pb ? h("div", { class: "small muted" }, `−${pct(1 - pa / pb)}`) : null),
      cell("Perplexity", "num",
        pplBefore || pplAfter ? beforeAfter(pplBefore?.value?.ppl, pplAfter?.value?.ppl) : "–"),
      cell("Accuracy", "num",
        meanAccuracy(ev.before) !== null ? beforeAfter(meanAccuracy(ev.before), meanAccuracy(ev.after), { higherIsBetter: true, format: (v) => num(v * 100, 1) }) : "–"));
  }

  load();
  return () => {
    alive = false;
    clearTimeout(timer);
    for (const stop of watchers.values()) stop();
  };
}
