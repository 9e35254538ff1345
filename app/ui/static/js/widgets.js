// Small pieces several views share: status badge, progress bar, before -> after cells.
import { h } from "./dom.js";
import { TERMINAL, num, pct } from "./format.js";

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}`, "data-testid": "status" }, status);
}

export function progressBar(job) {
  const value = Math.round(job.progress ?? 0);
  const cls = job.status === "succeeded" ? "bar done" : job.status === "failed" ? "bar bad" : "bar";
  const stage = TERMINAL.has(job.status) ? job.status : job.stage || job.status;
  const bar = h("div", {
    class: cls, role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": value,
    "aria-valuetext": `${value} %, ${stage}`, "aria-label": "progress", "data-testid": "progress",
  }, h("span", {}));
  bar.firstChild.style.width = `${value}%`;
  return h("div", {}, bar, h("div", { class: "progress-label" }, `${value} % · ${stage.replaceAll("_", " ")}`));
}

/** "before → after" with the relative change, coloured by whether higher is better. */
export function beforeAfter(before, after, { higherIsBetter = false, format = num } = {}) {
  if (before === null || before === undefined) return after === null || after === undefined ? "–" : format(after);
  if (after === null || after === undefined) return format(before);
  const change = before ? (after - before) / Math.abs(before) : 0;
  const worse = higherIsBetter ? change < 0 : change > 0;
  return h("span", {}, `${format(before)} → ${format(after)} `,
    h("span", { class: Math.abs(change) < 0.005 ? "muted" : worse ? "delta-bad" : "delta-good" }, `(${change >= 0 ? "+" : ""}${pct(change)})`));
}

/** Advice for failure codes a person can act on; the API's own message is always shown too. */
const FAILURE_ADVICE = {
  out_of_memory: "The model did not fit on the worker's device. Try fewer calibration samples, a shorter seq_len or a smaller micro_batch_size.",
  worker_lost: "The worker stopped heartbeating (killed, crashed or the machine went away). Retry the job; if it keeps happening, check the worker's logs and memory.",
  retry_limit: "The job used up its attempts. Retry resets the attempt budget.",
  eval_data_missing: "The server has no evaluation data directory. Evaluate on an uploaded text (dataset:<id>) instead, or ask the operator to set SLIMFORGE_EVAL_DATA_DIR.",
  dataset_not_found: "A dataset the job refers to was deleted. Upload it again and submit a new job.",
  broker_unavailable: "The job queue was unreachable when the job was submitted. Retry once the broker is back.",
  invalid_sparsity: "The requested sparsity cannot be reached with this model and these protections; lower it or protect fewer layers.",
  unsupported_architecture: "This method does not support the model's architecture; pick another method.",
  internal_error: "An unexpected error inside the worker. Retry; if it fails again, report the message below.",
};

export function failureAdvice(code) {
  return FAILURE_ADVICE[code] || "Fix what the message below names, then retry or submit a new job.";
}
