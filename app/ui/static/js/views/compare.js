// Compare succeeded jobs on one model: perplexity and accuracy against the fraction removed.
import { api } from "../api.js";
import { PALETTE, legend, lineChart } from "../charts.js";
import { h, mount } from "../dom.js";
import { meanAccuracy, modelName, num, params, perplexityAt, perplexityKeys, pct, removedFraction } from "../format.js";

export function compareView(root, query) {
  const chosen = new Set((query.get("ids") || "").split(",").filter(Boolean));
  let alive = true;
  let basisChoice = null; // null: layers when every job removed layers, else parameters
  const picker = h("fieldset", {}, h("legend", {}, "Jobs to compare (succeeded, same model)"));
  const output = h("div", { "aria-live": "polite" });
  const modelSelect = h("select", { id: "cmp-model" });
  mount(root, h("h1", {}, "Compare methods"),
    h("section", { class: "panel" },
      h("div", { class: "field", style: "max-width:480px" }, h("label", { for: "cmp-model" }, "Model"), modelSelect),
      picker),
    output);

  let jobs = [];
  (async () => {
    // Up to 200 recent succeeded jobs: enough to pick from, one request.
    const page = await api("/v1/jobs?status=succeeded&limit=200");
    if (!alive) return;
    jobs = page.items;
    const models = [...new Set(jobs.map((j) => j.model))];
    const preferred = jobs.find((j) => chosen.has(j.id))?.model || models[0];
    // Nothing asked for: start with the latest jobs on that model, so the page shows something.
    if (!chosen.size) jobs.filter((j) => j.model === preferred).slice(0, 6).forEach((j) => chosen.add(j.id));
    for (const m of models) modelSelect.append(h("option", { value: m, selected: m === preferred }, m));
    modelSelect.addEventListener("change", () => { chosen.clear(); renderPicker(); renderOutput(); });
    renderPicker();
    renderOutput();
  })().catch((err) => mount(output, h("div", { class: "alert", role: "alert" }, err.detail || String(err))));

  function onModel() { return jobs.filter((j) => j.model === modelSelect.value); }

  function renderPicker() {
    const list = onModel();
    mount(picker, h("legend", {}, "Jobs to compare (succeeded, same model)"),
      list.length ? null : h("p", { class: "muted" }, "No succeeded jobs yet."),
      ...list.map((j) => h("div", { class: "field inline" },
        h("input", { type: "checkbox", id: `cmp-${j.id}`, value: j.id, checked: chosen.has(j.id), onchange: (e) => {
          if (e.target.checked) chosen.add(j.id); else chosen.delete(j.id);
          history.replaceState(null, "", `#/compare?ids=${[...chosen].join(",")}`);
          renderOutput();
        } }), " ",
        h("label", { for: `cmp-${j.id}` }, `${j.method} · ${pct(j.target_sparsity, 0)} of ${j.sparsity_basis} · `, h("span", { class: "mono small" }, j.id)))));
  }

  function renderOutput() {
    const picked = onModel().filter((j) => chosen.has(j.id));
    if (picked.length < 1) return mount(output, h("p", { class: "muted" }, "Select jobs above."));
    // One x-axis for all: layers only when every job removed layers; parameters compare any methods.
    const basis = basisChoice || (picked.every((j) => j.result?.kind === "layer") ? "layers" : "parameters");
    const x = (j) => removedFraction(j, basis);
    // Only a perplexity every picked job measured is comparable (same text, same segment length).
    const shared = perplexityKeys(picked[0].result?.evaluation?.after)
      .filter((key) => picked.every((j) => perplexityAt(j.result?.evaluation?.after, key) !== null));
    const key = shared[0] || null;
    const methods = [...new Set(picked.map((j) => j.method))];
    const colour = (m) => PALETTE[methods.indexOf(m) % PALETTE.length];
    const point = (j, y) => ({ x: x(j), y, label: `${j.method}, ${pct(x(j))} of ${basis} removed: ${num(y)}` });
    const series = (value) => methods.map((m) => ({ name: m, color: colour(m),
      points: picked.filter((j) => j.method === m).map((j) => point(j, value(j.result?.evaluation?.after))) }));
    const pplSeries = key ? series((ev) => perplexityAt(ev, key)) : [];
    const accSeries = series(meanAccuracy);
    // The dense model is the point at 0 removed, from any job's "before" side.
    const dense = picked.find((j) => j.result?.evaluation?.before)?.result.evaluation.before;
    const densePpl = key ? perplexityAt(dense, key) : null, denseAcc = meanAccuracy(dense);
    if (densePpl !== null) pplSeries.push({ name: "dense", color: "#868e96", points: [{ x: 0, y: densePpl, label: `dense: ${num(densePpl)}` }] });
    if (denseAcc !== null) accSeries.push({ name: "dense", color: "#868e96", points: [{ x: 0, y: denseAcc, label: `dense: ${num(denseAcc)}` }] });
    const hasAcc = accSeries.some((ser) => ser.points.some((p) => Number.isFinite(p.y)));
    const xLabel = `fraction of ${basis} removed`;
    const basisPicker = h("div", { class: "field", role: "radiogroup", "aria-label": "x axis" },
      h("strong", {}, "x axis: "), ["layers", "parameters"].map((b) => h("span", { class: "field inline" },
        h("input", { type: "radio", name: "cmp-basis", id: `cmp-basis-${b}`, value: b, checked: b === basis,
          onchange: () => { basisChoice = b; renderOutput(); } }), " ", h("label", { for: `cmp-basis-${b}` }, `fraction of ${b}`), " ")));
    mount(output,
      h("section", { class: "panel", "aria-labelledby": "cmp-chart" },
        h("h2", { id: "cmp-chart" }, `Perplexity vs fraction removed · ${modelName(modelSelect.value)}`),
        basisPicker,
        key ? h("p", { class: "small muted" }, `on ${key} tokens (lower is better)`)
          : h("p", { class: "muted" }, "The selected jobs share no perplexity measurement (same text and length)."),
        key ? [lineChart(pplSeries, { xLabel, yLabel: "perplexity", label: "Perplexity against the fraction removed, per method", xFormat: (v) => pct(v, 0), testid: "compare-chart" }),
          legend(pplSeries.map((ser) => ({ name: ser.name, color: ser.color })))] : null,
        hasAcc ? [h("h2", {}, "Mean zero-shot accuracy vs fraction removed"),
          lineChart(accSeries, { xLabel, yLabel: "accuracy", label: "Accuracy against the fraction removed, per method", xFormat: (v) => pct(v, 0), yFormat: (v) => pct(v, 0) }),
          legend(accSeries.map((ser) => ({ name: ser.name, color: ser.color })))] : null),
      h("section", { class: "panel" }, h("div", { class: "table-wrap" }, h("table", { "data-testid": "compare-table" },
        h("caption", { class: "sr-only" }, "Compared jobs"),
        h("thead", {}, h("tr", {}, ["job", "method", "layers removed", "parameters removed", "parameters after", `perplexity${key ? ` (${key})` : ""} before → after`, "accuracy before → after"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, picked.sort((a, b) => (x(a) ?? 0) - (x(b) ?? 0)).map((j) => {
          const ev = j.result?.evaluation || {};
          const b = key ? perplexityAt(ev.before, key) : null, a = key ? perplexityAt(ev.after, key) : null;
          const ab = meanAccuracy(ev.before), aa = meanAccuracy(ev.after);
          return h("tr", {},
            h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(j.id)}`, class: "mono small" }, j.id)),
            h("td", {}, j.method, j.options?.compensation ? " + comp." : ""),
            h("td", { class: "num" }, pct(removedFraction(j, "layers"))),
            h("td", { class: "num" }, pct(removedFraction(j, "parameters"))),
            h("td", { class: "num" }, params(j.result?.parameters_after?.total)),
            h("td", { class: "num" }, b === null ? "–" : `${num(b)} → ${num(a)}`),
            h("td", { class: "num" }, ab === null ? "–" : `${pct(ab)} → ${pct(aa)}`));
        }))))));
  }

  return () => { alive = false; };
}
