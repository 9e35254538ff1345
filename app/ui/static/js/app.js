// Dashboard entry: sign-in (key in sessionStorage only), hash routing, sign-out.
import { ApiError, api, session } from "./api.js";
import { h, mount } from "./dom.js";
import { compareView } from "./views/compare.js";
import { jobView } from "./views/job.js";
import { listView } from "./views/list.js";
import { submitView } from "./views/submit.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
let cleanup = () => {};

function signInView(message) {
  const input = h("input", { id: "api-key", name: "api-key", type: "password", autocomplete: "off", required: true, spellcheck: "false",
    "aria-describedby": "key-hint key-error" });
  const error = h("div", { id: "key-error", role: "alert", class: message ? "alert" : "" }, message || "");
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h("form", { class: "panel signin", "aria-labelledby": "signin-title", onsubmit: async (e) => {
    e.preventDefault();
    const key = input.value.trim();
    if (!key) return showError("Enter an API key.");
    button.disabled = true;
    session.signIn(key);
    try {
      await api("/v1/jobs?limit=1", { notify401: false }); // proves the key works before showing anything
      route();
    } catch (err) {
      session.signOut();
      showError(err instanceof ApiError && err.status === 401
        ? `This key was not accepted: ${err.detail} Check it for typos, or ask the operator for one (slimforge create-key --tenant NAME).`
        : `Could not reach the API: ${err.detail || err.message}`);
    } finally {
      button.disabled = false;
    }
  } },
  h("h1", { id: "signin-title" }, "Sign in"),
  h("div", { class: "field" }, h("label", { for: "api-key" }, "API key"), input,
    h("div", { class: "hint", id: "key-hint" }, "Kept in this tab's session storage only and sent as a Bearer token; closing the tab or signing out forgets it.")),
  error, button);
  function showError(text) {
    error.className = "alert";
    error.textContent = text;
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
  nav.hidden = true;
  mount(main, form);
  input.focus();
}

function route() {
  cleanup();
  cleanup = () => {};
  if (!session.key()) return signInView();
  nav.hidden = false;
  const [path, queryString] = (location.hash.replace(/^#/, "") || "/jobs").split("?");
  const query = new URLSearchParams(queryString || "");
  const parts = path.split("/").filter(Boolean);
  const section = parts[0] || "jobs";
  for (const link of nav.querySelectorAll("a[data-route]")) {
    if (link.dataset.route === section && !(section === "jobs" && parts[1])) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const titles = { jobs: "Jobs", compare: "Compare", new: "New job" };
  document.title = `${parts[1] ? "Job" : titles[section] || "Slimforge"} · Slimforge`;
  if (section === "jobs" && parts[1]) cleanup = jobView(main, decodeURIComponent(parts[1]));
  else if (section === "compare") cleanup = compareView(main, query);
  else if (section === "new") cleanup = submitView(main);
  else cleanup = listView(main, query);
  main.focus({ preventScroll: true });
}

document.getElementById("sign-out").addEventListener("click", () => {
  session.signOut();
  cleanup();
  cleanup = () => {};
  history.replaceState(null, "", "#/jobs");
  signInView("Signed out: the key was removed from this tab.");
});

// A key revoked while the page is open: back to sign-in with the reason.
window.addEventListener("slimforge:unauthorized", (e) => {
  session.signOut();
  cleanup();
  cleanup = () => {};
  signInView(`The API no longer accepts this key: ${e.detail.detail}`);
});
window.addEventListener("hashchange", route);
route();
