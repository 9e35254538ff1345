// The /v1 API client: Bearer key from sessionStorage, problem+json errors, ETag revalidation.
const KEY_NAME = "slimforge.apiKey";

export const session = {
  key: () => sessionStorage.getItem(KEY_NAME),
  signIn: (key) => sessionStorage.setItem(KEY_NAME, key),
  signOut: () => sessionStorage.removeItem(KEY_NAME),
};

/** An API failure with the problem+json fields (code, detail, per-field errors). */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.code = problem.code || "http_error";
    this.detail = problem.detail || this.message;
    this.errors = Array.isArray(problem.errors) ? problem.errors : [];
  }
}

export function authHeaders(extra = {}) {
  const key = session.key();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

async function problemOf(response) {
  try {
    return await response.json();
  } catch {
    return { detail: `${response.status} ${response.statusText}` };
  }
}

/** fetch() a /v1 path with the key; returns parsed JSON, or throws ApiError. */
export async function api(path, { method = "GET", body, headers = {}, signal, notify401 = true } = {}) {
  const init = { method, headers: authHeaders(headers), signal };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { code: "network_error", detail: "The server cannot be reached; check that it is running." });
  }
  if (!response.ok) {
    const error = new ApiError(response.status, await problemOf(response));
    if (response.status === 401 && notify401) window.dispatchEvent(new CustomEvent("slimforge:unauthorized", { detail: error }));
    throw error;
  }
  return response.status === 204 ? null : response.json();
}

// Last representation of each job; sent back as If-None-Match when the server gave an ETag.
const jobCache = new Map();

/** GET /v1/jobs/{id}, revalidating with If-None-Match when an ETag is known (304 -> cached copy). */
export async function getJob(id, { signal } = {}) {
  const cached = jobCache.get(id);
  const headers = cached?.etag ? { "If-None-Match": cached.etag } : {};
  const response = await fetch(`/v1/jobs/${encodeURIComponent(id)}`, { headers: authHeaders(headers), signal });
  if (response.status === 304 && cached) return cached.job;
  if (!response.ok) {
    const error = new ApiError(response.status, await problemOf(response));
    if (response.status === 401) window.dispatchEvent(new CustomEvent("slimforge:unauthorized", { detail: error }));
    throw error;
  }
  const job = await response.json();
  jobCache.set(id, { etag: response.headers.get("ETag"), job });
  return job;
}

/** Every event of a job (the JSON endpoint pages with ?after=seq). */
export async function allEvents(id) {
  const events = [];
  for (;;) {
    const page = await api(`/v1/jobs/${encodeURIComponent(id)}/events?after=${events.length ? events[events.length - 1].seq : 0}`);
    events.push(...page);
    if (page.length < 500) return events;
  }
}

/** The artifact's slimforge_report.json (per-decision scores, compensation); null when absent. */
export async function artifactReport(artifactId) {
  const response = await fetch(`/v1/artifacts/${encodeURIComponent(artifactId)}/files/slimforge_report.json`, {
    headers: authHeaders(),
  });
  if (!response.ok) return null;
  return response.json();
}

/** Download an artifact file with the key (a plain link cannot send it) and save it under its name. */
export async function downloadFile(url, name) {
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) throw new ApiError(response.status, await problemOf(response));
  const blob = await response.blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}
