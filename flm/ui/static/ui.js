// FLM web UI: progressive enhancement over server-rendered pages. No third-party code.
"use strict";
(function () {
  document.documentElement.classList.add("js");
  const strings = JSON.parse(document.getElementById("flm-strings").textContent || "{}");
  const t = (key) => strings[key] || key;
  const csrf = document.body.dataset.csrf || "";
  const lang = document.documentElement.lang || "en";

  function announce(text, ok, requestId) {
    const live = document.getElementById("live-status");
    if (!live) return;
    live.className = "flash-live flash " + (ok ? "ok" : "error");
    live.textContent = text;
    if (!ok && requestId) {
      const rid = document.createElement("span");
      rid.className = "rid";
      rid.textContent = " " + t("js.request_id") + " ";
      const code = document.createElement("code");
      code.textContent = requestId;
      rid.appendChild(code);
      live.appendChild(rid);
    }
  }

  function localTimes(root) {
    const fmt = new Intl.DateTimeFormat(lang, { dateStyle: "medium", timeStyle: "medium" });
    root.querySelectorAll("time[datetime]").forEach((el) => {
      const d = new Date(el.getAttribute("datetime"));
      if (!isNaN(d)) { el.textContent = fmt.format(d); el.title = d.toISOString(); }
    });
  }

  async function copyText(text, button) {
    try {
      await navigator.clipboard.writeText(text);
      const old = button.textContent;
      button.textContent = t("js.copied");
      setTimeout(() => { button.textContent = old; }, 1500);
    } catch (e) {
      announce(t("js.copy_failed"), false);
    }
  }

  document.addEventListener("click", (ev) => {
    const button = ev.target.closest("button.copy");
    if (button) {
      let text = button.dataset.copy;
      if (button.dataset.copyFrom) text = document.getElementById(button.dataset.copyFrom).textContent;
      if (button.hasAttribute("data-copy-from-error")) text = button.parentElement.textContent;
      if (text) copyText(text.trim(), button);
      return;
    }
    const toggle = ev.target.closest(".menu-toggle");
    if (toggle) {
      const nav = document.getElementById("nav");
      const open = nav.classList.toggle("open");
      toggle.setAttribute("aria-expanded", String(open));
    }
  });

  document.querySelectorAll("form[data-autosubmit] select").forEach((sel) => {
    sel.addEventListener("change", () => sel.form.submit());
  });

  // The key dialog: the plaintext lives only in this dialog's text until it closes.
  const dialog = document.getElementById("key-dialog");
  function showKey(data) {
    document.getElementById("key-plaintext").textContent = data.plaintext;
    document.getElementById("key-curl").textContent = data.snippets.curl;
    document.getElementById("key-python").textContent = data.snippets.python;
    dialog.showModal();
    document.getElementById("key-plaintext").parentElement.querySelector("button").focus();
  }
  if (dialog) {
    dialog.addEventListener("close", () => {
      ["key-plaintext", "key-curl", "key-python"].forEach((id) => { document.getElementById(id).textContent = ""; });
      window.location.reload();
    });
  }

  document.addEventListener("submit", async (ev) => {
    const form = ev.target;
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) { ev.preventDefault(); return; }
    if (!form.hasAttribute("data-ajax")) return;
    ev.preventDefault();
    const button = form.querySelector("button[type=submit]");
    const label = button ? button.textContent : "";
    if (button) { button.disabled = true; button.setAttribute("aria-busy", "true"); button.textContent = t("js.working"); }
    try {
      const resp = await fetch(form.action, {
        method: "POST", body: new URLSearchParams(new FormData(form)),
        headers: { "Accept": "application/json", "X-CSRF-Token": csrf },
        credentials: "same-origin",
      });
      const body = await resp.json();
      if (!resp.ok || body.error) {
        const err = body.error || {};
        announce(err.message || t("js.failed"), false, err.request_id || resp.headers.get("x-request-id"));
        return;
      }
      if (form.hasAttribute("data-key-dialog") && body.data && body.data.plaintext) {
        form.reset();
        showKey(body.data);
        return;
      }
      announce(body.message || t("js.done"), true);
      if (document.querySelector("[data-poll]")) poll(); else window.location.reload();
    } catch (e) {
      announce(t("js.network"), false);
    } finally {
      if (button) { button.disabled = false; button.removeAttribute("aria-busy"); button.textContent = label; }
    }
  });

  // Live dashboard: poll a small JSON endpoint every 5 s while the tab is visible.
  const live = document.querySelector("[data-poll]");
  let polling = false;
  async function poll() {
    if (!live || polling || document.hidden) return;
    polling = true;
    try {
      const resp = await fetch(live.dataset.poll, { headers: { "Accept": "application/json" }, credentials: "same-origin" });
      if (resp.ok) {
        const body = await resp.json();
        for (const [name, html] of Object.entries(body.fragments || {})) {
          const el = live.querySelector('[data-fragment="' + name + '"]');
          if (el) { el.innerHTML = html; localTimes(el); sortable(el); }
        }
        live.dataset.polled = String(Number(live.dataset.polled || 0) + 1);
      }
    } catch (e) { /* the next tick retries */ }
    polling = false;
  }
  if (live) {
    setInterval(poll, 5000);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
  }

  // Chat tester: the same route and key a client would use, streamed with fetch + a reader;
  // with a second model, both stream side by side from one prompt.
  const chat = document.getElementById("chat-form");

  async function runChat(pane, target, key, model, prompt) {
    const out = pane.querySelector(".answer");
    const errBox = pane.querySelector(".chat-error");
    const meta = (name, value) => { pane.querySelector('[data-meta="' + name + '"]').textContent = value; };
    pane.hidden = false;
    pane.querySelector(".pane-model").textContent = model;
    errBox.hidden = true; out.textContent = ""; delete out.dataset.done;
    ["status", "ttft", "total", "tokens", "request_id"].forEach((n) => meta(n, ""));
    const showError = (message, rid) => {
      errBox.querySelector(".msg").textContent = message;
      errBox.querySelector("code").textContent = rid || "";
      errBox.hidden = false;
    };
    const started = performance.now();
    let first = null;
    try {
      const resp = await fetch(target + "/v1/chat/completions", {
        method: "POST",
        headers: { "Authorization": "Bearer " + key, "Content-Type": "application/json" },
        body: JSON.stringify({ model: model, stream: true, stream_options: { include_usage: true },
                               messages: [{ role: "user", content: prompt }] }),
      });
      const rid = resp.headers.get("x-request-id") || "";
      meta("status", String(resp.status)); meta("request_id", rid);
      if (!resp.ok) {
        let message = resp.statusText;
        try { const body = await resp.json(); message = (body.error && body.error.message) || message; } catch (e) { /* not JSON */ }
        showError(message, rid);
        return;
      }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, cut).trim();
          buffer = buffer.slice(cut + 1);
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          let chunk;
          try { chunk = JSON.parse(data); } catch (e) { continue; }
          if (chunk.error) { showError(chunk.error.message || t("js.failed"), rid); continue; }
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) { first = performance.now(); meta("ttft", Math.round(first - started) + " ms"); }
            out.textContent += delta.content;
          }
          if (chunk.usage) meta("tokens", chunk.usage.prompt_tokens + " / " + chunk.usage.completion_tokens);
        }
      }
      meta("total", Math.round(performance.now() - started) + " ms");
      out.dataset.done = "1";
    } catch (e) {
      showError(t("js.network_proxy"), "");
    }
  }

  if (chat) {
    chat.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const target = chat.target.value, key = chat.key.value.trim();
      if (!target) { announce(t("js.need_target"), false); return; }
      if (!key) { announce(t("js.need_key"), false); return; }
      const panes = document.querySelectorAll("[data-pane]");
      const button = document.getElementById("chat-send");
      button.disabled = true; button.setAttribute("aria-busy", "true");
      const runs = [runChat(panes[0], target, key, chat.model.value, chat.prompt.value)];
      if (chat.model2.value) runs.push(runChat(panes[1], target, key, chat.model2.value, chat.prompt.value));
      else panes[1].hidden = true;
      try { await Promise.all(runs); } finally { button.disabled = false; button.removeAttribute("aria-busy"); }
    });
  }

  // Sortable tables: a header button sorts its column (numbers as numbers, times by their
  // datetime, a cell's data-sort first), again to reverse. Tables the dashboard's poll redraws
  // keep the order chosen (remembered by table id).
  const sortState = {};
  function sortRows(table, column, up) {
    const body = table.tBodies[0];
    if (!body) return;
    const key = (row) => {
      const cell = row.cells[column];
      if (!cell) return "";
      if (cell.dataset.sort !== undefined) return cell.dataset.sort;
      const el = cell.querySelector("time");
      return el ? el.getAttribute("datetime") : cell.textContent.trim();
    };
    const rows = Array.from(body.rows);
    rows.sort((a, b) => {
      const x = key(a), y = key(b), nx = Number(x), ny = Number(y);
      const order = x !== "" && y !== "" && !isNaN(nx) && !isNaN(ny) ? nx - ny : x.localeCompare(y, lang);
      return up ? order : -order;
    });
    rows.forEach((row) => body.appendChild(row));
    table.querySelectorAll("thead th").forEach((h, i) => {
      if (i === column) h.setAttribute("aria-sort", up ? "ascending" : "descending");
      else h.removeAttribute("aria-sort");
    });
  }
  function sortable(root) {
    root.querySelectorAll("table[data-sortable]").forEach((table) => {
      if (table.dataset.sortReady) return;
      table.dataset.sortReady = "1";
      table.querySelectorAll("thead th").forEach((th, column) => {
        if (th.hasAttribute("data-nosort")) return;
        const button = document.createElement("button");
        button.type = "button";
        button.className = "sort";
        button.textContent = th.textContent;
        th.textContent = "";
        th.appendChild(button);
        button.addEventListener("click", () => {
          const up = th.getAttribute("aria-sort") !== "ascending";
          if (table.id) sortState[table.id] = [column, up];
          sortRows(table, column, up);
        });
      });
      const saved = table.id && sortState[table.id];
      if (saved) sortRows(table, saved[0], saved[1]);
    });
  }
  sortable(document);

  localTimes(document);
})();
