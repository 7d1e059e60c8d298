// The gallery: plain JS, no build step. The query lives in the URL (?q=, ?like=, ?random, &k=, &caption=,
// &min_similarity=) so that a search
// can be bookmarked, shared with the token stripped, and driven by a headless browser in the tests.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// The server turned ?token= into an HttpOnly cookie; we also keep it for fetch() and drop it from the address bar.
const token = params.get("token");
params.delete("token");
const selected = new Map(); // id -> score of the results ticked for export
let shown = [];
let vectors = "images"; // what the served index holds (/api/info): "images", or "captions", whose hits are captions

function setUrl(state) {
  const p = new URLSearchParams(state);
  p.set("k", $("k").value);
  history.replaceState(null, "", "?" + p.toString());
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers, credentials: "same-origin" }));
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// Asked once; a caption index's cards then say that their caption is what the query matched.
const served = api("/api/info").then(async (r) => {
  vectors = (await r.json()).vectors || "images";
  document.body.dataset.vectors = vectors;
}).catch(() => { /* no token: the query itself reports it */ });

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function card(hit) {
  const item = document.createElement("figure");
  item.className = "result";
  item.dataset.id = hit.id;
  const box = document.createElement("input");
  box.type = "checkbox";
  box.title = "select for download";
  box.checked = selected.has(hit.id);
  box.addEventListener("change", () => toggle(hit, box.checked, item));
  const img = document.createElement("img");
  img.src = hit.thumb;
  img.alt = hit.path;
  img.loading = "lazy";
  img.title = "more like this";
  img.addEventListener("click", () => run({ like: hit.id }));
  const meta = document.createElement("figcaption");
  meta.className = "meta";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score === null ? "" : hit.score.toFixed(3);
  const link = document.createElement("a");
  link.className = "path";
  link.href = hit.url;
  link.target = "_blank";
  link.title = hit.path;
  link.textContent = hit.path.split("/").pop();
  meta.append(score, link);
  item.append(box, img, meta);
  if (hit.caption) {
    const caption = document.createElement("p");
    caption.className = "caption";
    if (vectors === "captions") {
      caption.classList.add("matched");
      const label = document.createElement("strong");
      label.textContent = "matched caption: ";
      caption.append(label);
    }
    caption.append(hit.caption); // a text node: a caption is never parsed as HTML
    caption.title = hit.caption;
    item.append(caption);
  }
  if (box.checked) item.classList.add("selected");
  return item;
}

function toggle(hit, on, item) {
  if (on) selected.set(hit.id, hit.score); else selected.delete(hit.id);
  item.classList.toggle("selected", on);
  $("n-selected").textContent = selected.size;
  $("export").disabled = selected.size === 0;
}

function render(data, what) {
  shown = data.results;
  $("results").replaceChildren(...shown.map(card));
  const among = vectors === "captions" ? ", matched against captions" : "";
  status(`${shown.length} results for ${what} in ${data.took_ms.toFixed(1)} ms${among}`);
  document.body.dataset.state = "done";
}

async function run(state) {
  const k = $("k").value;
  document.body.dataset.state = "loading";
  $("subset").hidden = true;
  setUrl(state);
  try {
    await served;
    let data, what;
    if (state.q) {
      $("q").value = state.q;
      let filter = state.caption ? `&caption=${encodeURIComponent(state.caption)}` : "";
      if (state.min_similarity) filter += `&min_similarity=${encodeURIComponent(state.min_similarity)}`;
      data = await (await api(`/api/search?q=${encodeURIComponent(state.q)}&k=${k}${filter}`)).json();
      what = `"${state.q}"` + (state.caption ? ` with captions matching "${state.caption}"` : "");
      if (!state.caption && !state.min_similarity) subsetFor(state.q, data.results);
    } else if (state.like !== undefined) {
      data = await (await api("/api/search", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image_id: Number(state.like), k: Number(k) }),
      })).json();
      what = `images like #${state.like}`;
    } else {
      data = await (await api(`/api/random?k=${k}`)).json();
      what = "a random draw";
    }
    render(data, what);
  } catch (err) {
    status(err.message, true);
    document.body.dataset.state = "error";
  }
}

// The subset panel: how many images a threshold would keep, estimated from the index (its best SUBSET_K hits for
// the query, with the index's approximate scores), and the exact `clip-hpc filter` command that extracts them.
const SUBSET_K = 10000; // the server's MAX_K
let subsetScores = [];
let subsetQuery = "";

function shellQuote(text) {
  return "'" + text.replace(/'/g, "'\\''") + "'";
}

function showSubset() {
  const threshold = Number($("threshold").value).toFixed(2);
  $("threshold-value").textContent = threshold;
  const n = subsetScores.filter((s) => s >= Number(threshold)).length;
  const count = n >= SUBSET_K ? `at least ${SUBSET_K.toLocaleString()}` : `about ${n.toLocaleString()}`;
  $("subset-count").textContent = `${count} images score \u2265 ${threshold} (estimated from the index)`;
  const args = `EMB_DIR --out subset --text ${shellQuote(subsetQuery)} --threshold ${threshold} --to tars`;
  $("filter-command").textContent = `clip-hpc filter ${args}`;
  $("sbatch-command").textContent = `sbatch slurm/filter.sbatch ${args}`;
}

async function subsetFor(q, results) {
  $("subset").hidden = vectors !== "images";
  if (vectors !== "images") return;
  subsetQuery = q;
  // start at the last shown result's score, rounded down: every shown image is in the subset
  if (results.length) $("threshold").value = (Math.floor(results[results.length - 1].score * 100) / 100).toFixed(2);
  subsetScores = results.map((hit) => hit.score);
  showSubset();
  try {
    const all = await (await api(`/api/search?q=${encodeURIComponent(q)}&k=${SUBSET_K}`)).json();
    if (subsetQuery === q) { subsetScores = all.results.map((hit) => hit.score); showSubset(); }
  } catch (err) { /* the estimate stays the shown results' */ }
}

async function upload(file) {
  const form = new FormData();
  form.append("file", file);
  document.body.dataset.state = "loading";
  try {
    const data = await (await api(`/api/search/image?k=${$("k").value}`, { method: "POST", body: form })).json();
    render(data, file.name);
  } catch (err) {
    status(err.message, true);
    document.body.dataset.state = "error";
  }
}

async function exportZip() {
  const ids = [...selected.keys()];
  status(`packing ${ids.length} images…`);
  try {
    const response = await api("/api/export", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ids, scores: ids.map((id) => selected.get(id)) }),
    });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = "clip-hpc-export.zip";
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
    status(`downloaded ${ids.length} images`);
  } catch (err) {
    status(err.message, true);
  }
}

function selectAll(on) {
  document.querySelectorAll(".result").forEach((item, i) => {
    item.querySelector("input").checked = on;
    toggle(shown[i], on, item);
  });
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("q").value.trim();
  if (q) run({ q });
});
$("k").addEventListener("input", () => { $("k-value").textContent = $("k").value; });
$("k").addEventListener("change", () => {
  const state = Object.fromEntries(new URLSearchParams(location.search));
  delete state.k;
  if (Object.keys(state).length) run(state);
});
$("threshold").addEventListener("input", showSubset);
$("upload").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); });
$("random").addEventListener("click", () => run({ random: "1" }));
$("export").addEventListener("click", exportZip);
$("select-all").addEventListener("click", () => selectAll(true));
$("clear").addEventListener("click", () => selectAll(false));

if (params.has("k")) { $("k").value = params.get("k"); $("k-value").textContent = $("k").value; }
if (params.get("q")) {
  const state = { q: params.get("q") };
  for (const name of ["caption", "min_similarity"]) if (params.get(name)) state[name] = params.get(name);
  run(state);
}
else if (params.has("like")) run({ like: params.get("like") });
else if (params.has("random")) run({ random: "1" });
else history.replaceState(null, "", location.pathname);
