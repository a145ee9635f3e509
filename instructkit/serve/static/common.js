// Shared by the pages: the header, the optional API key, and JSON requests that send it.
"use strict";

const IK = (() => {
  const KEY = "instructkit.apiKey";
  const COOKIE = "instructkit_api_key";

  function key() {
    return localStorage.getItem(KEY) || "";
  }

  function setKey(value) {
    value = (value || "").trim();
    if (value) {
      localStorage.setItem(KEY, value);
      // Links to run reports cannot send a header; the server also reads this cookie for them.
      document.cookie = `${COOKIE}=${encodeURIComponent(value)}; path=/; SameSite=Strict`;
    } else {
      localStorage.removeItem(KEY);
      document.cookie = `${COOKIE}=; path=/; max-age=0; SameSite=Strict`;
    }
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const k = key();
    if (k) h["Authorization"] = "Bearer " + k;
    return h;
  }

  // The message of an OpenAI-style error body, or the status line.
  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    return `${response.status} ${response.statusText}`;
  }

  function askKey(reason) {
    const box = document.getElementById("key-box");
    if (!box) return;
    box.hidden = false;
    document.getElementById("key-reason").textContent = reason || "";
    document.getElementById("key-input").focus();
  }

  function header(active) {
    const top = document.getElementById("top");
    const nav = document.createElement("nav");
    const brand = document.createElement("strong");
    brand.textContent = "instructkit";
    nav.appendChild(brand);
    for (const [href, label] of [["/chat", "Chat"], ["/rank", "Rank"], ["/runs", "Runs"]]) {
      const a = document.createElement("a");
      a.href = href;
      a.textContent = label;
      if (label.toLowerCase() === active) a.setAttribute("aria-current", "page");
      nav.appendChild(a);
    }
    const keyButton = document.createElement("button");
    keyButton.type = "button";
    keyButton.id = "key-button";
    keyButton.className = "quiet";
    keyButton.textContent = key() ? "API key ✓" : "API key";
    keyButton.addEventListener("click", () => askKey(""));
    nav.appendChild(keyButton);
    top.appendChild(nav);

    const form = document.createElement("form");
    form.id = "key-box";
    form.hidden = true;
    form.innerHTML =
      '<label for="key-input">API key (kept in this browser)</label> ' +
      '<input id="key-input" type="password" autocomplete="off"> ' +
      '<button type="submit">Save</button> <button type="button" id="key-clear" class="quiet">Clear</button> ' +
      '<span id="key-reason" class="error"></span>';
    top.appendChild(form);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      setKey(document.getElementById("key-input").value);
      keyButton.textContent = key() ? "API key ✓" : "API key";
      form.hidden = true;
      document.dispatchEvent(new Event("ik-key-changed"));
    });
    document.getElementById("key-clear").addEventListener("click", () => {
      setKey("");
      document.getElementById("key-input").value = "";
      keyButton.textContent = "API key";
    });
  }

  // A random id for one submission, resent unchanged when retried (no crypto.randomUUID:
  // it exists only in secure contexts, and a LAN address over http is not one).
  function randomId() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  return { key, setKey, headers, errorText, askKey, header, randomId };
})();
