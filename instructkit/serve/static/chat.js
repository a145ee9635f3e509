// Chat page: keeps the conversation and streams each answer from /v1/chat/completions
// (stream: true), parsing the server-sent events out of the response body as they arrive.
"use strict";

IK.header("chat");

const conversation = [];  // {role, content} turns so far, without the system message
const view = document.getElementById("conversation");
const input = document.getElementById("message");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const statusLine = document.getElementById("status");
let controller = null;

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `bubble ${role}`;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role;
  const body = document.createElement("pre");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  view.appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function number(id, fallback) {
  const value = parseFloat(document.getElementById(id).value);
  return Number.isFinite(value) ? value : fallback;
}

// Yields the data of each server-sent event in the body, as the bytes arrive.
async function* events(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (data.length) yield data.join("\n");
    }
  }
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant", "");
  const out = answer.querySelector(".text");
  answer.dataset.state = "streaming";
  answer.dataset.chunks = "0";
  const system = document.getElementById("system").value.trim();
  const request = {
    messages: (system ? [{ role: "system", content: system }] : []).concat(conversation),
    stream: true,
    temperature: number("temperature", 0.7),
    top_p: number("top-p", 0.95),
    max_tokens: Math.round(number("max-tokens", 256)),
  };
  controller = new AbortController();
  sendButton.disabled = true;
  stopButton.disabled = false;
  statusLine.textContent = "generating…";
  let text_ = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: IK.headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(request),
      signal: controller.signal,
    });
    if (!response.ok) {
      const message = await IK.errorText(response);
      if (response.status === 401) IK.askKey(message);
      throw new Error(message);
    }
    for await (const data of events(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta && chunk.choices[0].delta.content;
      if (piece) {
        text_ += piece;
        out.textContent = text_;
        answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
      }
    }
    conversation.push({ role: "assistant", content: text_ });
    answer.dataset.state = "done";
    statusLine.textContent = "";
  } catch (err) {
    if (err.name === "AbortError") {
      conversation.push({ role: "assistant", content: text_ });  // keep what arrived
      answer.dataset.state = "stopped";
      statusLine.textContent = "stopped";
    } else {
      conversation.pop();  // the question was not answered; it can be sent again
      answer.dataset.state = "error";
      answer.classList.add("error");
      out.textContent = text_ + (text_ ? "\n" : "") + "Error: " + err.message;
      statusLine.textContent = "";
    }
  } finally {
    controller = null;
    sendButton.disabled = false;
    stopButton.disabled = true;
    input.focus();
  }
}

document.getElementById("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    document.getElementById("composer").requestSubmit();
  }
});
stopButton.addEventListener("click", () => controller && controller.abort());
document.getElementById("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  view.replaceChildren();
  input.focus();
});
input.focus();
