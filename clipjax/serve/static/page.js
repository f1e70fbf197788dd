// The clipjax search page: plain DOM calls against the JSON API of this server.
"use strict";

const $ = (selector) => document.querySelector(selector);

function setStatus(text, isError = false) {
  $("#status").textContent = text;
  $("#status").classList.toggle("error", isError);
}

async function search(query, label) {
  const body = { ...query, k: parseInt($("#k").value, 10) || 24 };
  const threshold = $("#threshold").value.trim();
  if (threshold !== "") body.threshold = parseFloat(threshold);
  setStatus(`searching ${label}…`);
  const start = performance.now();
  let response, data;
  try {
    response = await fetch("/api/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    data = await response.json();
  } catch (err) {
    setStatus(`search failed: ${err}`, true);
    return;
  }
  if (!response.ok) {
    setStatus(`error ${response.status}: ${data.error}`, true);
    return;
  }
  render(data);
  const ms = Math.round(performance.now() - start);
  setStatus(`${data.length} result${data.length === 1 ? "" : "s"} for ${label} in ${ms} ms`);
}

function render(hits) {
  const grid = $("#results");
  grid.replaceChildren();
  for (const hit of hits) {
    const card = document.createElement("figure");
    card.className = "result";
    card.dataset.id = hit.id;
    card.dataset.path = hit.path;
    const link = document.createElement("a");
    link.href = `/image/${hit.id}`;
    link.target = "_blank";
    link.rel = "noopener";
    const img = document.createElement("img");
    img.src = hit.thumbnail;
    img.alt = hit.path;
    img.loading = "lazy";
    img.addEventListener("error", () => {  // e.g. the file moved, or points outside
      img.classList.add("missing");
      img.alt = "no preview";
    });
    link.append(img);
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const path = document.createElement("span");
    path.className = "path";
    path.textContent = hit.path;  // text, never HTML: file names cannot inject markup
    caption.append(score, " ", path);
    const more = document.createElement("button");
    more.className = "more";
    more.type = "button";
    more.textContent = "more like this";
    more.addEventListener("click", () => search({ like: hit.id }, `images like ${hit.path}`));
    card.append(link, caption, more);
    grid.append(card);
  }
}

function searchFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const preview = $("#query-image");
    preview.src = reader.result;
    preview.hidden = false;
    search({ image: reader.result.split(",", 2)[1] }, `images like ${file.name}`);
  };
  reader.onerror = () => setStatus(`cannot read ${file.name}`, true);
  reader.readAsDataURL(file);
}

function setUp() {
  $("#search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("#query").value.trim();
    if (text) search({ text }, `“${text}”`);
  });
  $("#file").addEventListener("change", (event) => searchFile(event.target.files[0]));
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    searchFile(event.dataTransfer.files[0]);
  });
  fetch("/api/info").then((r) => r.json()).then((info) => {
    $("#info").textContent = `${info.size} images · ${info.dim} dimensions · ` +
      `model ${info.model ?? "?"} step ${info.step ?? "?"} · ${info.index} index`;
  }).catch(() => {});
}

setUp();
