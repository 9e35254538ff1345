// Live job updates: the SSE event stream read through fetch() (EventSource cannot send the
// Authorization header), falling back to polling GET /v1/jobs/{id} with If-None-Match.
import { authHeaders, getJob } from "./api.js";
import { TERMINAL } from "./format.js";

// Browsers allow ~6 HTTP/1.1 connections per host; keep some free for ordinary requests.
const MAX_STREAMS = 3;
const POLL_MS = 2000;
let openStreams = 0;

/** Parse an SSE byte stream into {id, event, data} messages. */
export async function* sseMessages(reader) {
  const decoder = new TextDecoder();
  let buffer = "";
  let message = { data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.search(/\r?\n/)) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + (buffer[newline] === "\r" ? 2 : 1));
      if (line === "") {
        if (message.data.length) yield { id: message.id, event: message.event || "message", data: message.data.join("\n") };
        message = { data: [] };
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") message.data.push(value);
        else if (field === "id") message.id = value;
        else if (field === "event") message.event = value;
      }
    }
  }
}

/**
 * Call onJob(job) whenever job `id` changes, until it is terminal or stop() is called.
 * onEvent(event) gets each SSE event (when streaming). Returns stop().
 */
export function watchJob(id, onJob, { onEvent = () => {}, onError = () => {} } = {}) {
  const controller = new AbortController();
  let stopped = false;
  let lastSeq = 0;
  let refreshing = null;
  let pending = false;

  // Coalesce bursts of events into one (conditional) GET.
  async function refresh() {
    if (refreshing) { pending = true; return refreshing; }
    refreshing = (async () => {
      try {
        const job = await getJob(id, { signal: controller.signal });
        if (!stopped) onJob(job);
        return job;
      } catch (err) {
        if (err.name === "AbortError" || stopped) return null; // stopped while a request was in flight
        throw err;
      } finally {
        refreshing = null;
        if (pending && !stopped) { pending = false; refresh().catch(onError); }
      }
    })();
    return refreshing;
  }

  async function stream() {
    const response = await fetch(`/v1/jobs/${encodeURIComponent(id)}/events/stream?after=${lastSeq}`, {
      headers: authHeaders({ Accept: "text/event-stream" }),
      signal: controller.signal,
    });
    if (!response.ok || !response.body || typeof response.body.getReader !== "function") {
      if (response.body) response.body.cancel().catch(() => {});
      return false;
    }
    const reader = response.body.getReader();
    for await (const message of sseMessages(reader)) {
      if (message.id) lastSeq = Number(message.id) || lastSeq;
      try { onEvent(JSON.parse(message.data)); } catch { /* a malformed event is skipped */ }
      refresh().catch(onError);
    }
    return true;
  }

  async function poll() {
    while (!stopped) {
      const job = await refresh();
      if (!job || TERMINAL.has(job.status)) return;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }

  (async () => {
    try {
      let job = await refresh();
      while (!stopped && job && !TERMINAL.has(job.status)) {
        let streamed = false;
        if (openStreams < MAX_STREAMS) {
          openStreams += 1;
          try { streamed = await stream(); } catch (err) { if (err.name === "AbortError") return; } finally { openStreams -= 1; }
        }
        if (!streamed) return await poll();
        job = await refresh(); // the stream ended: terminal, or the connection dropped (reconnect)
        if (job && !TERMINAL.has(job.status)) await new Promise((resolve) => setTimeout(resolve, 1000));
      }
    } catch (err) {
      if (err.name !== "AbortError" && !stopped) onError(err);
    }
  })();

  return () => { stopped = true; controller.abort(); };
}
