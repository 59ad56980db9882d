// The console's only script: follow a page's live part over server-sent
// events, draw the overview's chart, and ask before a destructive action.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];
const SVG = "http://www.w3.org/2000/svg";

function drawChart(data) {
  const svg = document.getElementById("chart");
  const legend = document.getElementById("legend");
  if (!svg || !data) return;
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  legend.textContent = "";
  const times = data.t;
  const names = Object.keys(data.lines);
  let top = 1;
  for (const name of names) for (const v of data.lines[name]) top = Math.max(top, v);
  const span = Math.max(60, times.length ? -times[0] : 60);
  const x = (t) => 600 * (1 + t / span);
  const y = (v) => 155 - (150 * v) / top;
  names.forEach((name, i) => {
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", data.lines[name].map((v, k) => `${x(times[k]).toFixed(1)},${y(v).toFixed(1)}`).join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLORS[i % COLORS.length]);
    line.setAttribute("stroke-width", "2");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.appendChild(line);
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = COLORS[i % COLORS.length];
    item.appendChild(swatch);
    item.appendChild(document.createTextNode(`priority ${name}`));
    legend.appendChild(item);
  });
  const label = document.createElement("span");
  label.className = "dim";
  label.textContent = `max ${top} · last ${Math.round(span)} s`;
  legend.appendChild(label);
}

function follow(live) {
  const source = new EventSource(live.dataset.live);
  source.onmessage = (event) => {
    const frame = JSON.parse(event.data);
    live.innerHTML = frame.html; // rendered and escaped by the server
    if (frame.chart) drawChart(frame.chart);
    live.dataset.updated = String(Date.now());
  };
  source.addEventListener("end", (event) => {
    const frame = JSON.parse(event.data);
    live.innerHTML = frame.html;
    live.dataset.ended = "true";
    source.close();
  });
  source.onerror = () => { live.classList.add("stale"); };
  source.onopen = () => { live.classList.remove("stale"); };
}

document.addEventListener("DOMContentLoaded", () => {
  const data = document.getElementById("chart-data");
  if (data) drawChart(JSON.parse(data.textContent));
  const live = document.getElementById("live");
  if (live && live.dataset.live) follow(live);
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
});
