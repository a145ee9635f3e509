// Ranking page: one prompt and its K responses; the person orders them (drag, or keyboard),
// marks ties, and submits or skips. Each answer carries an id made here once and resent on
// retries, so a submission whose reply was lost is never stored twice.
"use strict";

IK.header("rank");

const NAME_KEY = "instructkit.annotator";
const list = document.getElementById("responses");
const live = document.getElementById("live");
const message = document.getElementById("message");
let current = null;  // {prompt_id, submission_id}
let busy = false;

function annotator() {
  return localStorage.getItem(NAME_KEY) || "";
}

function show(id, visible) {
  document.getElementById(id).hidden = !visible;
}

function showWho() {
  const name = annotator();
  show("who-form", !name);
  show("who", !!name);
  document.getElementById("who-name").textContent = name;
  if (!name) document.getElementById("annotator").focus();
}

function showProgress(p) {
  const el = document.getElementById("progress");
  el.dataset.total = p.total;
  el.dataset.ranked = p.ranked;
  el.dataset.skipped = p.skipped;
  el.textContent = `Ranked ${p.ranked} / ${p.total}` + (p.skipped ? ` (${p.skipped} skipped)` : "") +
    ` · prompts with a ranking from anyone: ${p.prompts_ranked} / ${p.total}`;
}

// ---- the list: order, ties, labels ------------------------------------------------------------

function items() {
  return Array.from(list.children);
}

function relabel() {
  let rank = 0;
  items().forEach((li, position) => {
    if (position === 0) li.dataset.tied = "false";
    if (li.dataset.tied !== "true") rank = position + 1;
    const tied = li.dataset.tied === "true" || (items()[position + 1] && items()[position + 1].dataset.tied === "true");
    li.querySelector(".rank-label").textContent = tied ? `${rank}=` : String(rank);
    li.querySelector(".tie").setAttribute("aria-pressed", li.dataset.tied === "true" ? "true" : "false");
    li.querySelector(".tie").disabled = position === 0;
    li.setAttribute("aria-label", `rank ${rank}${li.dataset.tied === "true" ? ", tied with the one above" : ""}`);
  });
}

function announce(li) {
  const position = items().indexOf(li) + 1;
  live.textContent = `response moved to position ${position} of ${items().length}`;
}

function move(li, delta) {
  const siblings = items();
  const position = siblings.indexOf(li);
  const target = position + delta;
  if (target < 0 || target >= siblings.length) return;
  if (delta < 0) list.insertBefore(li, siblings[target]);
  else list.insertBefore(li, siblings[target].nextSibling);
  relabel();
  li.focus();
  announce(li);
}

function toggleTie(li) {
  if (items().indexOf(li) === 0) return;
  li.dataset.tied = li.dataset.tied === "true" ? "false" : "true";
  relabel();
  live.textContent = li.dataset.tied === "true" ? "tied with the one above" : "no longer tied";
}

function responseItem(response) {
  const li = document.createElement("li");
  li.className = "response";
  li.tabIndex = 0;
  li.draggable = true;
  li.dataset.index = response.index;
  li.dataset.tied = "false";
  const label = document.createElement("div");
  label.className = "rank-label";
  const text = document.createElement("pre");
  text.className = "text";
  if (response.text.trim()) text.textContent = response.text;
  else {
    text.textContent = "(empty response)";
    text.classList.add("empty");
  }
  const controls = document.createElement("div");
  controls.className = "controls";
  for (const [cls, label_, title, action] of [
    ["up", "↑", "move up", () => move(li, -1)],
    ["down", "↓", "move down", () => move(li, +1)],
    ["tie", "=", "tie with the one above", () => toggleTie(li)],
  ]) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = `quiet ${cls}`;
    b.textContent = label_;
    b.title = title;
    b.setAttribute("aria-label", title);
    b.tabIndex = -1;  // the item itself takes the keys; these are for the mouse
    b.addEventListener("click", action);
    controls.appendChild(b);
  }
  li.append(label, text, controls);

  li.addEventListener("keydown", (e) => {
    if (e.target !== li) return;
    if (e.key === "ArrowUp" || e.key === "ArrowDown") {
      e.preventDefault();
      const delta = e.key === "ArrowUp" ? -1 : 1;
      if (e.shiftKey || e.altKey) move(li, delta);
      else {
        const next = items()[items().indexOf(li) + delta];
        if (next) next.focus();
      }
    } else if (e.key === "t" || e.key === "T") {
      e.preventDefault();
      toggleTie(li);
    }
  });
  li.addEventListener("dragstart", (e) => {
    li.classList.add("dragging");
    e.dataTransfer.effectAllowed = "move";
    e.dataTransfer.setData("text/plain", li.dataset.index);
  });
  li.addEventListener("dragend", () => {
    li.classList.remove("dragging");
    relabel();
  });
  return li;
}

// While dragging, the dragged item sits before the first item whose middle is below the pointer.
list.addEventListener("dragover", (e) => {
  const dragged = list.querySelector(".dragging");
  if (!dragged) return;
  e.preventDefault();
  e.dataTransfer.dropEffect = "move";
  const after = items().find((li) => {
    if (li === dragged) return false;
    const box = li.getBoundingClientRect();
    return e.clientY < box.top + box.height / 2;
  });
  if (after) {
    if (dragged.nextSibling !== after) list.insertBefore(dragged, after);
  } else if (list.lastElementChild !== dragged) {
    list.appendChild(dragged);
  }
});
list.addEventListener("drop", (e) => {
  e.preventDefault();
  const dragged = list.querySelector(".dragging");
  if (dragged) {
    relabel();
    announce(dragged);
  }
});

// ---- loading and submitting ---------------------------------------------------------------------

function shuffled(array) {
  // Shown in a random order, so the order they were sampled in cannot sway the ranking.
  const a = array.slice();
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}

function showPrompt(prompt) {
  const box = document.getElementById("prompt");
  box.replaceChildren();
  for (const turn of prompt.messages) {
    const div = document.createElement("div");
    div.className = "turn";
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = turn.role;
    const text = document.createElement("pre");
    text.className = "text";
    text.textContent = turn.content;
    div.append(role, text);
    box.appendChild(div);
  }
  list.replaceChildren(...shuffled(prompt.responses).map(responseItem));
  relabel();
  current = { prompt_id: prompt.prompt_id, submission_id: IK.randomId() };
  document.getElementById("task").dataset.promptId = prompt.prompt_id;
  message.textContent = "";
  list.firstElementChild.focus();
}

async function request(url, options) {
  const response = await fetch(url, Object.assign({}, options, {
    headers: IK.headers(Object.assign({ "Content-Type": "application/json" }, (options || {}).headers)),
  }));
  if (response.status === 401) IK.askKey(await IK.errorText(response.clone()));
  return response;
}

async function loadNext() {
  const name = annotator();
  if (!name) return;
  const response = await request(`/label/next?annotator=${encodeURIComponent(name)}`);
  if (!response.ok) {
    const text = await IK.errorText(response);
    show("task", false);
    document.getElementById("unavailable").textContent = text;
    show("unavailable", true);
    return;
  }
  show("unavailable", false);
  const body = await response.json();
  showProgress(body.progress);
  if (body.prompt === null) {
    current = null;
    show("task", false);
    show("done", true);
    return;
  }
  show("done", false);
  show("task", true);
  showPrompt(body.prompt);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function submit(skip) {
  if (!current || busy) return;
  busy = true;
  document.getElementById("submit").disabled = document.getElementById("skip").disabled = true;
  const body = { submission_id: current.submission_id, prompt_id: current.prompt_id, annotator: annotator(), skip };
  if (!skip) {
    body.order = items().map((li) => Number(li.dataset.index));
    body.tied = items().map((li, i) => i > 0 && li.dataset.tied === "true");
  }
  message.textContent = "";
  try {
    for (let attempt = 0; ; attempt++) {
      let response = null;
      try {
        response = await request("/label/rank", { method: "POST", body: JSON.stringify(body) });
      } catch (err) { /* network error: retry with the same submission id */ }
      if (response && (response.ok || response.status === 409)) {
        if (response.status === 409) live.textContent = await IK.errorText(response);
        await loadNext();
        return;
      }
      if (response && response.status < 500 && response.status !== 429) {
        message.textContent = await IK.errorText(response);
        message.className = "error";
        return;
      }
      if (attempt >= 5) {
        message.textContent = "the server did not answer; your ranking is kept here, press Submit again";
        message.className = "error";
        return;
      }
      await sleep(500 * 2 ** attempt);
    }
  } finally {
    busy = false;
    document.getElementById("submit").disabled = document.getElementById("skip").disabled = false;
  }
}

document.getElementById("submit").addEventListener("click", () => submit(false));
document.getElementById("skip").addEventListener("click", () => submit(true));
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && current) {
    e.preventDefault();
    submit(false);
  }
});
document.getElementById("who-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = document.getElementById("annotator").value.trim();
  if (!name) return;
  localStorage.setItem(NAME_KEY, name);
  showWho();
  loadNext();
});
document.getElementById("change-name").addEventListener("click", () => {
  localStorage.removeItem(NAME_KEY);
  document.getElementById("annotator").value = "";
  current = null;
  show("task", false);
  show("done", false);
  showWho();
});
document.addEventListener("ik-key-changed", loadNext);

showWho();
loadNext();
