// Number, time and job-field formatting shared by every view.
export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function num(value, digits = 2) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  if (Math.abs(value) >= 1e4) return value.toLocaleString("en-US", { maximumFractionDigits: 0 });
  return value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function pct(fraction, digits = 1) {
  return fraction === null || fraction === undefined ? "–" : `${(fraction * 100).toFixed(digits)} %`;
}

export function params(n) {
  if (n === null || n === undefined) return "–";
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} k`;
  return String(n);
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

// The API's timestamps are UTC; older rows may lack the zone suffix.
export function parseTime(value) {
  if (!value) return null;
  return new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(value) ? value : `${value}Z`);
}

export function jobSeconds(job) {
  const start = parseTime(job.started_at);
  if (!start) return null;
  const end = parseTime(job.finished_at) || new Date();
  return Math.max(0, (end - start) / 1000);
}

export function when(value) {
  const t = parseTime(value);
  return t ? t.toLocaleString() : "–";
}

export function modelName(model) {
  if (!model) return "–";
  const parts = model.split("/").filter(Boolean);
  return model.startsWith("/") ? parts[parts.length - 1] : model;
}

export function target(job) {
  if (job.quality_budget !== undefined && job.quality_budget !== null) return `quality budget ${num(job.quality_budget)}`;
  return `${pct(job.target_sparsity, 0)} of ${job.sparsity_basis}`;
}

/** What the job took out: layers, or heads and channels for width pruning. */
export function removedSummary(result) {
  if (!result) return "–";
  if (Array.isArray(result.removed_layers)) return `${result.removed_layers.length} layers`;
  const groups = result.removed_groups;
  if (groups) {
    let heads = 0, channels = 0;
    for (const g of Object.values(groups)) {
      heads += (g.query_heads || []).length;
      channels += g.n_channels || 0;
    }
    return `${heads} heads, ${channels.toLocaleString("en-US")} channels`;
  }
  return "–";
}

/** The first perplexity (text, length) of an evaluation block, or null. */
export function firstPerplexity(evaluation) {
  const sets = evaluation?.perplexity || {};
  for (const [text, byLen] of Object.entries(sets)) {
    for (const [len, value] of Object.entries(byLen)) return { text, len, value };
  }
  return null;
}

export function meanAccuracy(evaluation) {
  if (!evaluation) return null;
  if (typeof evaluation.tasks_mean_acc === "number") return evaluation.tasks_mean_acc;
  return null;
}

/** Fraction of the model removed, counted in layers or in parameters (the x-axis of comparisons). */
export function removedFraction(job, basis = job.sparsity_basis) {
  const r = job.result;
  if (!r) return null;
  const value = basis === "layers" ? r.achieved_layer_sparsity : r.achieved_parameter_sparsity;
  return typeof value === "number" ? value : null;
}

/** "text @ length" keys of every perplexity an evaluation block has. */
export function perplexityKeys(evaluation) {
  return Object.entries(evaluation?.perplexity || {}).flatMap(([text, byLen]) => Object.keys(byLen).map((len) => `${text} @ ${len}`));
}

export function perplexityAt(evaluation, key) {
  const at = key.lastIndexOf(" @ ");
  return evaluation?.perplexity?.[key.slice(0, at)]?.[key.slice(at + 3)]?.ppl ?? null;
}
