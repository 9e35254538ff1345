// Submit form: model, method + schema-rendered options, target, calibration, evaluation; a dry-run
// preview first; API errors are shown next to the field they concern.
import { ApiError, api } from "../api.js";
import { h, mount, toast } from "../dom.js";
import { num, params, pct } from "../format.js";
import { optionsForm } from "../schema-form.js";

const OTHER = "__other__";
// Error codes the API returns without a field path, mapped to the field they concern.
const CODE_FIELDS = {
  unknown_model: "model", model_not_installed: "model", invalid_model: "model", path_not_allowed: "model",
  unknown_method: "method", unsupported_architecture: "method", invalid_sparsity: "target_sparsity",
  eval_data_missing: "evaluation.perplexity", invalid_cursor: null,
};
const DISCRIMINATORS = new Set(["self_generated", "dataset"]);

function field(key, label, control, hint) {
  const errId = `err-${key}`;
  control.setAttribute("aria-describedby", `${errId}${hint ? ` hint-${key}` : ""}`);
  return h("div", { class: "field", "data-field": key },
    h("label", { for: control.id }, label), control,
    hint ? h("div", { class: "hint", id: `hint-${key}` }, hint) : null,
    h("div", { class: "error-text", id: errId }));
}

function radio(name, value, label, checked) {
  const id = `${name}-${value}`;
  return h("span", { class: "field inline" }, h("input", { type: "radio", id, name, value, checked }), " ", h("label", { for: id }, label), " ");
}

export function submitView(root) {
  let alive = true;
  let methods = [];
  let opts = null;
  const uploads = new WeakMap(); // File -> dataset id, so preview + submit upload once

  const modelSelect = h("select", { id: "model", name: "model" });
  const modelPath = h("input", { id: "model-path", name: "model-path", placeholder: "/models/my-llama or org/name", autocomplete: "off" });
  const pathField = field("model-path", "Local directory or Hugging Face id", modelPath);
  const methodSelect = h("select", { id: "method", name: "method" });
  const methodHelp = h("p", { class: "hint", id: "method-help" });
  const optionsBox = h("div", {});
  const sparsity = h("input", { id: "target_sparsity", name: "target_sparsity", type: "number", min: 0.01, max: 0.99, step: 0.01, value: 0.25, inputmode: "decimal" });
  const calDataset = h("select", { id: "cal-dataset" });
  const calFile = h("input", { id: "cal-file", type: "file", accept: ".txt,.jsonl,text/plain" });
  const nSamples = h("input", { id: "cal-n_samples", type: "number", min: 1, max: 1024, step: 1, value: 8 });
  const seqLen = h("input", { id: "cal-seq_len", type: "number", min: 8, max: 8192, step: 1, value: 128 });
  const evalOn = h("input", { type: "checkbox", id: "eval-on" });
  const evalTexts = h("div", { id: "eval-texts", role: "group", "aria-labelledby": "eval-texts-label" });
  const evalFile = h("input", { id: "eval-file", type: "file", accept: ".txt,.jsonl,text/plain" });
  const evalSeqLens = h("input", { id: "eval-seq_lens", value: "128", inputmode: "numeric" });
  const evalMaxTokens = h("input", { id: "eval-max_tokens", type: "number", min: 16, value: 32768 });
  const evalTasks = h("input", { id: "eval-tasks", placeholder: "arc_easy, piqa", autocomplete: "off" });
  const evalLimit = h("input", { id: "eval-limit", type: "number", min: 1, value: 200 });
  const evalSpeed = h("input", { type: "checkbox", id: "eval-speed", checked: true });
  const seed = h("input", { id: "seed", type: "number", min: 0, step: 1, value: 0 });
  const formError = h("div", { role: "alert", id: "form-error" });
  const preview = h("section", { class: "panel", "data-testid": "preview", "aria-live": "polite", hidden: true });
  const previewButton = h("button", { type: "button", id: "preview-button", onclick: () => send(true) }, "Preview plan (dry run)");
  const submitButton = h("button", { type: "submit", class: "primary", id: "submit-button" }, "Submit job");

  const evalBox = h("div", { id: "eval-box", hidden: true },
    h("div", { class: "field", "data-field": "evaluation.perplexity" },
      h("span", { id: "eval-texts-label", class: "label" }, h("strong", {}, "Perplexity on")), evalTexts,
      h("div", { class: "hint" }, "wikitext2 and ptb need SLIMFORGE_EVAL_DATA_DIR on the server; uploaded texts always work. Never evaluate on your calibration text."),
      h("div", { class: "error-text", id: "err-evaluation.perplexity" })),
    field("eval-file", "…or upload a text to evaluate on", evalFile),
    h("div", { class: "fields" },
      field("evaluation.seq_lens", "Segment lengths", evalSeqLens, "comma-separated, e.g. 128, 2048"),
      field("evaluation.max_tokens", "Max tokens per text", evalMaxTokens),
      field("evaluation.tasks", "Zero-shot tasks", evalTasks, "comma-separated; need the server's eval data"),
      field("evaluation.limit", "Questions per task", evalLimit)),
    h("div", { class: "field inline" }, evalSpeed, " ", h("label", { for: "eval-speed" }, "Measure speed (tokens/s)")));

  const form = h("form", { "aria-labelledby": "new-title", novalidate: true, onsubmit: (e) => { e.preventDefault(); send(false); } },
    formError,
    h("fieldset", {}, h("legend", {}, "Model and method"),
      field("model", "Model", modelSelect, null), pathField,
      field("method", "Method", methodSelect), methodHelp,
      h("details", {}, h("summary", {}, "Method options (defaults shown; only changes are sent)"), optionsBox)),
    h("fieldset", {}, h("legend", {}, "Target"),
      field("target_sparsity", "Fraction to remove", sparsity, "strictly between 0 and 1, e.g. 0.25"),
      h("div", { class: "field", role: "radiogroup", "aria-labelledby": "basis-label", "data-field": "sparsity_basis" },
        h("span", { id: "basis-label" }, h("strong", {}, "Counted in ")),
        radio("basis", "layers", "decoder layers", true), radio("basis", "parameters", "parameters", false),
        h("div", { class: "error-text", id: "err-sparsity_basis" }))),
    h("fieldset", { "data-field": "calibration" }, h("legend", {}, "Calibration"),
      h("div", { class: "field", role: "radiogroup", "aria-label": "Calibration source" },
        radio("cal", "self_generated", "self-generated by the model", true),
        radio("cal", "dataset", "an uploaded dataset", false),
        radio("cal", "upload", "upload a file now", false)),
      h("div", { id: "cal-dataset-box", hidden: true }, field("calibration.dataset_id", "Dataset", calDataset)),
      h("div", { id: "cal-file-box", hidden: true }, field("cal-file", "Calibration file (.txt, or .jsonl with a text field)", calFile)),
      h("div", { class: "fields" },
        field("calibration.n_samples", "Samples", nSamples), field("calibration.seq_len", "Tokens per sample", seqLen)),
      h("div", { class: "error-text", id: "err-calibration" })),
    h("fieldset", { "data-field": "evaluation" }, h("legend", {}, "Evaluation"),
      h("div", { class: "field inline" }, evalOn, " ", h("label", { for: "eval-on" }, "Evaluate before and after pruning")),
      evalBox, h("div", { class: "error-text", id: "err-evaluation" })),
    h("fieldset", {}, h("legend", {}, "Reproducibility"), field("seed", "Seed", seed)),
    h("div", { class: "row" }, previewButton, submitButton));

  mount(root, h("h1", { id: "new-title" }, "New job"), h("div", { class: "panel" }, form), preview);

  form.addEventListener("change", (e) => {
    if (e.target.name === "cal") syncCalibration();
    if (e.target === evalOn) evalBox.hidden = !evalOn.checked;
    if (e.target === modelSelect) pathField.hidden = modelSelect.value !== OTHER;
    if (e.target === methodSelect) renderOptions();
    preview.hidden = true;
  });

  function syncCalibration() {
    const source = form.querySelector("input[name=cal]:checked").value;
    root.querySelector("#cal-dataset-box").hidden = source !== "dataset";
    root.querySelector("#cal-file-box").hidden = source !== "upload";
  }

  function renderOptions() {
    const method = methods.find((m) => m.name === methodSelect.value);
    methodHelp.textContent = method ? `${method.kind} method: ${method.description}` : "";
    opts = method ? optionsForm(method.options_schema) : null;
    optionsBox.replaceChildren(opts ? opts.element : "");
  }

  (async () => {
    const [models, catalog, datasets] = await Promise.all([api("/v1/models"), api("/v1/methods"), api("/v1/datasets")]);
    if (!alive) return;
    for (const m of models.models) {
      const state = !m.installed ? "not installed" : m.cached ? "ready" : "installed, first job unpacks it";
      modelSelect.append(h("option", { value: m.id, disabled: !m.installed }, `${m.id} · ${m.num_layers} layers · ${state}`));
    }
    modelSelect.append(h("option", { value: OTHER }, "Local directory or Hugging Face id…"));
    if (!models.models.some((m) => m.installed)) modelSelect.value = OTHER;
    pathField.hidden = modelSelect.value !== OTHER;
    const roots = models.local_roots.length ? `Local models only under: ${models.local_roots.join(", ")}.` : "This server allows no local model directories.";
    pathField.querySelector(".error-text").before(h("div", { class: "hint" }, `${roots} ${models.hub}.`));
    methods = catalog.methods;
    for (const m of methods) methodSelect.append(h("option", { value: m.name, selected: m.name === "gradmap" }, `${m.name} (${m.kind})`));
    renderOptions();
    const items = Array.isArray(datasets) ? datasets : datasets.items || [];
    if (!items.length) calDataset.append(h("option", { value: "" }, "no datasets uploaded yet"));
    for (const d of items) calDataset.append(h("option", { value: d.id }, `${d.name} · ${d.n_texts} texts · ${d.id}`));
    for (const name of ["wikitext2", "ptb"]) evalTexts.append(textBox(name, name));
    for (const d of items) evalTexts.append(textBox(`dataset:${d.id}`, `${d.name} (${d.id})`));
  })().catch((err) => mount(formError, h("div", { class: "alert" }, h("strong", {}, "Could not load the catalog: "), err.detail || String(err))));

  function textBox(value, label) {
    const id = `eval-text-${value.replace(/[^a-z0-9]/gi, "-")}`;
    return h("span", { class: "field inline" }, h("input", { type: "checkbox", id, value, name: "eval-text" }), " ", h("label", { for: id }, label), " ");
  }

  async function datasetFor(input, key) {
    const file = input.files[0];
    if (!file) throw Object.assign(new Error("choose a file"), { field: key });
    if (uploads.has(file)) return uploads.get(file);
    const body = new FormData();
    body.append("file", file, file.name);
    try {
      const dataset = await api("/v1/datasets", { method: "POST", body });
      uploads.set(file, dataset.id);
      return dataset.id;
    } catch (err) {
      err.field = key;
      throw err;
    }
  }

  /** Read the form into a job body; client-side checks mirror the API's. */
  async function body() {
    const errors = {};
    const model = modelSelect.value === OTHER ? modelPath.value.trim() : modelSelect.value;
    if (!model) errors[modelSelect.value === OTHER ? "model-path" : "model"] = "choose a model";
    const target = Number(sparsity.value);
    if (!(target > 0 && target < 1)) errors.target_sparsity = "must be strictly between 0 and 1";
    const { options, errors: optionErrors } = opts ? opts.values() : { options: {}, errors: {} };
    Object.assign(errors, optionErrors);
    const calibration = { source: "self_generated", n_samples: Number(nSamples.value), seq_len: Number(seqLen.value) };
    if (!(Number.isInteger(calibration.n_samples) && calibration.n_samples >= 1 && calibration.n_samples <= 1024)) errors["calibration.n_samples"] = "a whole number from 1 to 1024";
    if (!(Number.isInteger(calibration.seq_len) && calibration.seq_len >= 8 && calibration.seq_len <= 8192)) errors["calibration.seq_len"] = "a whole number from 8 to 8192";
    let evaluation = null;
    if (evalOn.checked) {
      const lens = evalSeqLens.value.split(",").map((x) => x.trim()).filter(Boolean).map(Number);
      if (!lens.length || lens.some((x) => !Number.isInteger(x) || x < 16 || x > 8192)) errors["evaluation.seq_lens"] = "whole numbers from 16 to 8192";
      evaluation = {
        perplexity: [...evalTexts.querySelectorAll("input:checked")].map((x) => x.value),
        seq_lens: lens,
        max_tokens: evalMaxTokens.value ? Number(evalMaxTokens.value) : null,
        tasks: evalTasks.value.split(",").map((x) => x.trim()).filter(Boolean),
        limit: evalLimit.value ? Number(evalLimit.value) : null,
        speed: evalSpeed.checked,
      };
    }
    if (Object.keys(errors).length) throw Object.assign(new Error("check the marked fields"), { fields: errors });
    const source = form.querySelector("input[name=cal]:checked").value;
    if (source === "dataset") {
      if (!calDataset.value) throw Object.assign(new Error("no dataset"), { fields: { "calibration.dataset_id": "upload a dataset first, or pick another source" } });
      Object.assign(calibration, { source: "dataset", dataset_id: calDataset.value });
    } else if (source === "upload") {
      Object.assign(calibration, { source: "dataset", dataset_id: await datasetFor(calFile, "cal-file") });
    }
    if (evaluation && evalFile.files[0]) evaluation.perplexity.push(`dataset:${await datasetFor(evalFile, "eval-file")}`);
    const basis = form.querySelector("input[name=basis]:checked").value;
    return { model, method: methodSelect.value, target_sparsity: target, sparsity_basis: basis, calibration, options, evaluation, seed: Number(seed.value || 0) };
  }

  function clearErrors() {
    formError.replaceChildren();
    for (const el of form.querySelectorAll(".error-text")) el.textContent = "";
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  }

  /** Put each message under the most specific field that exists; the rest go on top of the form. */
  function showErrors(fields, summary) {
    const loose = [];
    let first = null;
    for (const [key, message] of Object.entries(fields)) {
      const parts = key.split(".").filter((p) => !DISCRIMINATORS.has(p) && !/^\d+$/.test(p));
      let box = null;
      while (parts.length && !(box = document.getElementById(`err-${parts.join(".")}`))) parts.pop();
      if (!box) { loose.push(`${key}: ${message}`); continue; }
      box.textContent = box.textContent ? `${box.textContent}; ${message}` : message;
      const control = box.closest(".field, fieldset")?.querySelector("input, select");
      if (control) { control.setAttribute("aria-invalid", "true"); first = first || control; }
    }
    if (summary || loose.length) {
      mount(formError, h("div", { class: "alert" }, h("strong", {}, summary || "Please fix: "), loose.join("; ")));
    }
    (first || formError).focus?.();
  }

  function apiFields(err) {
    if (err.errors.length) return Object.fromEntries(err.errors.map((e) => [e.field || "form", e.message]));
    if (err.code === "invalid_options" || err.code === "invalid_evaluation") {
      return Object.fromEntries(err.detail.split("; ").map((part) => {
        const at = part.indexOf(": ");
        return at > 0 ? [part.slice(0, at), part.slice(at + 2)] : ["form", part];
      }));
    }
    if (err.code === "dataset_not_found") return { [/evaluation|dataset:/.test(err.detail) ? "evaluation.perplexity" : "calibration.dataset_id"]: err.detail };
    if (err.field) return { [err.field]: err.detail };
    const key = CODE_FIELDS[err.code];
    return key ? { [key]: err.detail } : null;
  }

  async function send(dryRun) {
    clearErrors();
    const button = dryRun ? previewButton : submitButton;
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    try {
      const job = await body();
      const headers = dryRun ? {} : { "Idempotency-Key": crypto.randomUUID() };
      const result = await api(`/v1/jobs${dryRun ? "?dry_run=true" : ""}`, { method: "POST", body: job, headers });
      if (dryRun) return showPlan(result.plan);
      toast(`Submitted ${result.id}`);
      location.hash = "#/jobs";
    } catch (err) {
      if (err.fields) return showErrors(err.fields, "Please fix the marked fields.");
      if (err instanceof ApiError) {
        const fields = apiFields(err);
        if (fields) return showErrors(fields, `The API rejected the job (${err.code}).`);
        return showErrors({}, `The API rejected the job (${err.code}): ${err.detail}`);
      }
      showErrors({}, String(err.message || err));
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
  }

  function showPlan(plan) {
    preview.hidden = false;
    const removed = plan.removed_layers ? plan.removed_layers.join(", ") : plan.selection || "decided while running";
    mount(preview, h("h2", {}, "Plan (dry run: nothing was queued)"),
      h("dl", { class: "kv" },
        h("dt", {}, "Method"), h("dd", {}, `${plan.method} (${plan.kind})`),
        plan.layers_before !== undefined ? [h("dt", {}, "Layers"), h("dd", {}, `${plan.layers_before} → ${plan.layers_after} (remove ${plan.k})`)] : null,
        plan.kind === "layer" ? [h("dt", {}, "Which layers"), h("dd", {}, removed)] : null,
        h("dt", {}, "Parameters"), h("dd", {}, `${params(plan.parameters_before?.total)} → ${params(plan.parameters_after?.total)}`),
        plan.achieved_sparsity ? [h("dt", {}, "Achieved"), h("dd", {},
          Object.entries(plan.achieved_sparsity).map(([k, v]) => `${k.replaceAll("_", " ")} ${pct(v)}`).join(" · "))] : null,
        plan.compensation !== undefined ? [h("dt", {}, "Compensation"), h("dd", {}, plan.compensation ? "yes" : "no")] : null,
        Object.entries(plan).filter(([k, v]) => !["method", "kind", "k", "layers_before", "layers_after", "removed_layers", "selection", "parameters_before", "parameters_after", "achieved_sparsity", "achieved_layer_sparsity", "compensation"].includes(k) && typeof v !== "object")
          .map(([k, v]) => [h("dt", {}, k.replaceAll("_", " ")), h("dd", {}, typeof v === "number" ? num(v, 4) : String(v))])),
      h("p", { class: "small muted" }, "Submit to run it; the plan is recomputed by the worker."));
    preview.scrollIntoView({ block: "nearest" });
  }

  return () => { alive = false; };
}
