// Runs page: the run folders the server found under --runs, their summary numbers, and links
// to their files (report.html first).
"use strict";

IK.header("runs");

function fileUrl(run, name) {
  return "/runs/file/" + run.path.split("/").map(encodeURIComponent).join("/") + "/" + encodeURIComponent(name);
}

function format(value) {
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  return abs !== 0 && (abs < 1e-3 || abs >= 1e6) ? value.toExponential(3) : String(Number(value.toFixed(4)));
}

function cell(row, content) {
  const td = document.createElement("td");
  if (typeof content === "string") td.textContent = content;
  else if (content) td.appendChild(content);
  row.appendChild(td);
  return td;
}

async function load() {
  const response = await fetch("/runs/list", { headers: IK.headers() });
  const empty = document.getElementById("empty");
  if (!response.ok) {
    const text = await IK.errorText(response);
    if (response.status === 401) IK.askKey(text);
    empty.textContent = text;
    empty.className = "error";
    empty.hidden = false;
    return;
  }
  const body = await response.json();
  document.getElementById("where").textContent = body.runs_dir
    ? `Run folders under ${body.runs_dir} (newest first)` : "No runs folder is served (start with --runs DIR).";
  const tbody = document.getElementById("runs");
  tbody.replaceChildren();
  for (const run of body.runs) {
    const tr = document.createElement("tr");
    tr.dataset.path = run.path;
    cell(tr, run.path);
    cell(tr, (run.stage || "") + (run.finished ? "" : " (unfinished)"));
    const numbers = document.createElement("div");
    for (const [k, v] of Object.entries(run.numbers)) {
      const span = document.createElement("span");
      span.className = "num";
      const key = document.createElement("b");
      key.textContent = k + " ";
      span.append(key, format(v));
      numbers.appendChild(span);
    }
    cell(tr, numbers);
    const files = document.createElement("div");
    for (const name of run.files) {
      const a = document.createElement("a");
      a.href = fileUrl(run, name);
      a.textContent = name === "report.html" ? "report" : name;
      a.className = name === "report.html" ? "report" : "";
      files.append(a, " ");
    }
    cell(tr, files);
    cell(tr, new Date(run.modified * 1000).toLocaleString());
    tbody.appendChild(tr);
  }
  document.querySelector("table.runs").hidden = body.runs.length === 0;
  empty.hidden = body.runs.length !== 0;
  empty.className = "muted";
  if (body.runs_dir && body.runs.length === 0) empty.textContent = "No run folders yet.";
}

document.addEventListener("ik-key-changed", load);
load();
