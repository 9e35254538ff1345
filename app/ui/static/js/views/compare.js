// Compare succeeded jobs on one model: perplexity and accuracy against the fraction removed.
import { api } from "../api.js";
import { PALETTE, legend, lineChart } from "../charts.js";
import { h, mount } from "../dom.js";
import { firstPerplexity, meanAccuracy, modelName, num, params, pct, removedFraction } from "../format.js";

export function compareView(root, query) {
  const chosen = new Set((query.get("ids") || "").split(",").filter(Boolean));
  let alive = true;
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
    const methods = [...new Set(picked.map((j) => j.method))];
    const colour = (m) => PALETTE[methods.indexOf(m) % PALETTE.length];
    const point = (j, y) => ({ x: removedFraction(j), y, label: `${j.method}, ${pct(removedFraction(j))} removed: ${num(y)}` });
    const pplSeries = methods.map((m) => ({ name: m, color: colour(m),
      points: picked.filter((j) => j.method === m).map((j) => point(j, firstPerplexity(j.result?.evaluation?.after)?.value?.ppl)) }));
    const accSeries = methods.map((m) => ({ name: m, color: colour(m),
      points: picked.filter((j) => j.method === m).map((j) => point(j, meanAccuracy(j.result?.evaluation?.after))) }));
    // The dense model is the point at 0 removed, from any job's "before" side.
    const dense = picked.find((j) => j.result?.evaluation?.before)?.result.evaluation.before;
    const densePpl = firstPerplexity(dense)?.value?.ppl, denseAcc = meanAccuracy(dense);
    if (densePpl !== undefined) pplSeries.push({ name: "dense", color: "#868e96", points: [{ x: 0, y: densePpl, label: `dense: ${num(densePpl)}` }] });
    if (denseAcc !== null) accSeries.push({ name: "dense", color: "#868e96", points: [{ x: 0, y: denseAcc, label: `dense: ${num(denseAcc)}` }] });
    const pplText = firstPerplexity(dense);
    const hasAcc = accSeries.some((s) => s.points.some((p) => Number.isFinite(p.y)));
    const basis = [...new Set(picked.map((j) => j.sparsity_basis))];
    const xLabel = `fraction removed (${basis.join(" / ")})`;
    mount(output,
      h("section", { class: "panel", "aria-labelledby": "cmp-chart" },
        h("h2", { id: "cmp-chart" }, `Perplexity vs fraction removed · ${modelName(modelSelect.value)}`),
        pplText ? h("p", { class: "small muted" }, `on ${pplText.text} @ ${pplText.len} tokens (lower is better)`) : h("p", { class: "muted" }, "These jobs have no perplexity evaluation."),
        lineChart(pplSeries, { xLabel, yLabel: "perplexity", label: "Perplexity against the fraction removed, per method", xFormat: (v) => pct(v, 0), testid: "compare-chart" }),
        legend(pplSeries.map((s) => ({ name: s.name, color: s.color }))),
        hasAcc ? [h("h2", {}, "Mean zero-shot accuracy vs fraction removed"),
          lineChart(accSeries, { xLabel, yLabel: "accuracy", label: "Accuracy against the fraction removed, per method", xFormat: (v) => pct(v, 0), yFormat: (v) => pct(v, 0) })] : null),
      h("section", { class: "panel" }, h("div", { class: "table-wrap" }, h("table", { "data-testid": "compare-table" },
        h("caption", { class: "sr-only" }, "Compared jobs"),
        h("thead", {}, h("tr", {}, ["job", "method", "removed", "parameters after", "perplexity before → after", "accuracy before → after"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, picked.sort((a, b) => (removedFraction(a) ?? 0) - (removedFraction(b) ?? 0)).map((j) => {
          const ev = j.result?.evaluation || {};
          const b = firstPerplexity(ev.before)?.value?.ppl, a = firstPerplexity(ev.after)?.value?.ppl;
          const ab = meanAccuracy(ev.before), aa = meanAccuracy(ev.after);
          return h("tr", {},
            h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(j.id)}`, class: "mono small" }, j.id)),
            h("td", {}, j.method, j.options?.compensation ? " + comp." : ""),
            h("td", { class: "num" }, pct(removedFraction(j))),
            h("td", { class: "num" }, params(j.result?.parameters_after?.total)),
            h("td", { class: "num" }, b === undefined ? "–" : `${num(b)} → ${num(a)}`),
            h("td", { class: "num" }, ab === null ? "–" : `${pct(ab)} → ${pct(aa)}`));
        }))))));
  }

  return () => { alive = false; };
}
