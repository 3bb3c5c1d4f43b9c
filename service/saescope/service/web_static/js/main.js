// The explorer's shell: loads GetInfo, keeps the chosen SAE, routes #/page/... to a page
// module, and shows failures (asking for the API key when the service wants one).
import { ApiError, apiKey, call, setApiKey } from "./api.js";
import { contrastPage } from "./pages/contrast.js";
import { featurePage } from "./pages/feature.js";
import { promptPage } from "./pages/prompt.js";
import { searchPage } from "./pages/search.js";
import { steerPage } from "./pages/steer.js";

const PAGES = {
  search: searchPage,
  feature: featurePage,
  prompt: promptPage,
  steer: steerPage,
  contrast: contrastPage,
};
const SAE = "saescope-sae";

export const state = { info: null, sae: "" };

export function showError(err) {
  const box = document.getElementById("error");
  if (!err) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  const code = err instanceof ApiError ? err.code : "ERROR";
  box.textContent = `${code}: ${err.message}`;
  box.dataset.code = code;
  box.hidden = false;
  if (code === "UNAUTHENTICATED" || code === "PERMISSION_DENIED") askForKey();
}

function askForKey() {
  const form = document.getElementById("key-form");
  form.hidden = false;
  document.getElementById("key-input").focus();
}

// The route: "#/feature/sae/12?x=1" → { page: "feature", parts: ["sae", "12"], query }.
export function route() {
  const [path, qs] = location.hash.replace(/^#\/?/, "").split("?");
  const [page, ...parts] = path.split("/").map(decodeURIComponent);
  return { page: PAGES[page] ? page : "search", parts, query: new URLSearchParams(qs || "") };
}

async function loadInfo() {
  state.info = await call("GetInfo");
  const select = document.getElementById("sae");
  select.replaceChildren();
  for (const s of state.info.saes) {
    const label = `${s.sae_id} (${s.hookpoint}, ${s.d_sae} features${s.has_catalog ? "" : ", no catalog"})`;
    select.append(new Option(label, s.sae_id));
  }
  const saved = sessionStorage.getItem(SAE);
  const ids = state.info.saes.map((s) => s.sae_id);
  state.sae = ids.includes(saved) ? saved : state.info.default_sae_id || ids[0];
  select.value = state.sae;
  document.getElementById("model").textContent =
    `${state.info.model} · ${state.info.device} · v${state.info.version}`;
}

export function saeInfo(id = state.sae) {
  return state.info.saes.find((s) => s.sae_id === id);
}

async function render() {
  const r = route();
  document.querySelectorAll("nav a").forEach((a) => {
    a.classList.toggle("active", a.dataset.page === r.page);
  });
  const main = document.getElementById("page");
  showError(null);
  try {
    if (!state.info) await loadInfo();
    main.replaceChildren();
    main.dataset.page = r.page;
    await PAGES[r.page](main, r);
  } catch (err) {
    showError(err);
  }
}

function setUp() {
  document.getElementById("sae").addEventListener("change", (e) => {
    state.sae = e.target.value;
    sessionStorage.setItem(SAE, state.sae);
    if (route().page === "feature") location.hash = "#/search";
    else render();
  });
  document.getElementById("key-button").addEventListener("click", askForKey);
  document.getElementById("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey(document.getElementById("key-input").value.trim());
    e.target.hidden = true;
    state.info = null;
    render();
  });
  document.getElementById("key-button").classList.toggle("set", Boolean(apiKey()));
  window.addEventListener("hashchange", render);
  render();
}

setUp();
