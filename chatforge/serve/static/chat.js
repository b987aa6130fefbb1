// chatforge web chat: talks to this server's /v1/chat/completions with streaming (server-sent events).
// Everything the model writes is untrusted: it is put on the page only as text nodes (textContent,
// createTextNode), never as HTML, and links are kept only for http(s) URLs. No external assets.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;
let history = [];          // the conversation sent to the API (chatforge_messages keep tool calls exact)
let controller = null;     // AbortController of the reply being streamed

// ---------------------------------------------------------------------------------------------
// Markdown -> DOM (a small subset: fenced code, headings, lists, quotes, rules, paragraphs;
// inline code, bold, italic, links). Builds elements; text always goes in as text nodes.

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([\s\S]+?)\*\*|__([\s\S]+?)__|\*([^*\s](?:[^*]*[^*\s])?)\*|\[([^\]\n]+)\]\(([^()\s]+)\)/g;

function safeUrl(url) {
  try {
    const u = new URL(url, "http://invalid.invalid/");
    return (u.protocol === "http:" || u.protocol === "https:") && /^https?:\/\//i.test(url) ? u.href : null;
  } catch (e) { return null; }
}

function inline(text, parent) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {  // (matchAll scans a copy of the regex: recursion cannot disturb it)
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    if (m[1] !== undefined) parent.appendChild(el("code", "", m[2]));
    else if (m[3] !== undefined || m[4] !== undefined) inline(m[3] !== undefined ? m[3] : m[4], parent.appendChild(el("strong")));
    else if (m[5] !== undefined) inline(m[5], parent.appendChild(el("em")));
    else {
      const href = safeUrl(m[7]);
      if (href) {
        const a = el("a");
        a.href = href; a.rel = "noopener noreferrer nofollow"; a.target = "_blank";
        inline(m[6], a);
        parent.appendChild(a);
      } else parent.appendChild(document.createTextNode(m[0]));
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

function inlineLines(lines, parent) {
  lines.forEach((line, i) => {
    if (i) parent.appendChild(el("br"));
    inline(line, parent);
  });
}

function renderMarkdown(text, parent) {
  const lines = text.split("\n");
  let i = 0, para = [];
  const flush = () => { if (para.length) { inlineLines(para, parent.appendChild(el("p"))); para = []; } };
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/.exec(line))) {
      flush();
      const fence = m[1], body = [];
      i++;
      while (i < lines.length && !(lines[i].trim().startsWith(fence) && lines[i].trim().replace(/[`~]/g, "") === "")) {
        body.push(lines[i]); i++;
      }
      i++;  // the closing fence (or the end of a reply still streaming)
      const code = el("code", m[2] ? "language-" + m[2] : "", body.join("\n"));
      parent.appendChild(el("pre")).appendChild(code);
      continue;
    }
    if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) {
      flush();
      inline(m[2], parent.appendChild(el("h" + Math.min(6, m[1].length + 2))));
    } else if (/^\s{0,3}([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flush();
      parent.appendChild(el("hr"));
    } else if (/^\s*>/.test(line)) {
      flush();
      const quote = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) quote.push(lines[i++].replace(/^\s*>\s?/, ""));
      inlineLines(quote, parent.appendChild(el("blockquote")));
      continue;
    } else if ((m = /^\s*([-*+]|\d{1,9}[.)])\s+/.exec(line))) {
      flush();
      const ordered = /\d/.test(m[1]);
      const list = parent.appendChild(el(ordered ? "ol" : "ul"));
      while (i < lines.length && (m = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/.exec(lines[i])) && /\d/.test(m[1]) === ordered) {
        inline(m[2], list.appendChild(el("li")));
        i++;
      }
      continue;
    } else if (line.trim() === "") {
      flush();
    } else {
      para.push(line);
    }
    i++;
  }
  flush();
}

// ---------------------------------------------------------------------------------------------
// Messages on the page.

function addMessage(role, text) {
  const m = el("div", "msg " + role);
  m.appendChild(el("div", "who", role === "user" ? "you" : "assistant"));
  const body = m.appendChild(el("div", "body"));
  if (text !== undefined) body.textContent = text;
  $("messages").appendChild(m);
  m.scrollIntoView({block: "end"});
  return m;
}

// A reply is a list of parts: {part: "text" | "python" | "search" | "output", text}. Text goes through
// the Markdown renderer; a tool call and its result get boxes of their own.
function renderReply(msg, parts) {
  const body = msg.querySelector(".body");
  body.replaceChildren();
  let text = "";
  const flushText = () => { if (text) { renderMarkdown(text, body); text = ""; } };
  for (const p of parts) {
    if (p.part === "text") { text += p.text; continue; }
    flushText();
    const box = body.appendChild(el("div", "tool " + (p.part === "output" ? "output" : "call")));
    box.appendChild(el("div", "label", p.part === "output" ? "result" : p.part + " call"));
    box.appendChild(el("pre")).appendChild(el("code", "", p.text));
  }
  flushText();
}

// ---------------------------------------------------------------------------------------------
// The API.

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  const r = await fetch("/v1/models", {headers: headers()});
  if (r.status === 401) {
    $("key-label").hidden = false;
    $("model").textContent = "this server needs an API key";
    return;
  }
  const data = await r.json();
  model = data.data[0].id;
  $("model").textContent = model + " (context " + data.data[0].max_model_len + " tokens)";
}

function errorText(status, body) {
  try { return "error " + status + ": " + JSON.parse(body).error.message; } catch (e) { return "error " + status; }
}

async function send(text) {
  if (!model) await loadModel();
  if (!model) return;
  history.push({role: "user", content: text});
  addMessage("user", text);
  const msg = addMessage("assistant");
  msg.dataset.state = "streaming";
  msg.dataset.chunks = "0";
  const parts = [];
  let finish = null, native = null, calls = null;
  setBusy(true);
  controller = new AbortController();
  const req = {model, messages: history, stream: true, temperature: parseFloat($("temperature").value)};
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) req.max_tokens = maxTokens;
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; renderReply(msg, parts); msg.scrollIntoView({block: "end"}); });
  };
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(req),
                                                   signal: controller.signal});
    if (!r.ok) throw new Error(errorText(r.status, await r.text()));
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error("error: " + chunk.error.message);
          const choice = (chunk.choices || [])[0];
          if (!choice) continue;
          const d = choice.delta || {};
          if (d.content) {
            const part = d.chatforge_part || "text";
            if (part !== "markup") {
              const lastPart = parts[parts.length - 1];
              if (lastPart && lastPart.part === part) lastPart.text += d.content;
              else parts.push({part, text: d.content});
            }
            msg.dataset.chunks = String(parseInt(msg.dataset.chunks, 10) + 1);
            redraw();
          }
          if (d.tool_calls) calls = d.tool_calls;
          if (choice.finish_reason) finish = choice.finish_reason;
          if (choice.chatforge_messages) native = choice.chatforge_messages;
        }
      }
    }
    msg.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      msg.dataset.state = "stopped";
      finish = "stopped";
    } else {
      msg.dataset.state = "error";
      msg.classList.add("error");
      parts.push({part: "text", text: "\n\n" + e.message});
    }
  } finally {
    controller = null;
    setBusy(false);
  }
  renderReply(msg, parts);
  msg.dataset.finish = finish || "";
  if (msg.dataset.state === "error") {
    history.pop();  // the user can send it again
    return;
  }
  if (native) history.push(...native);
  else history.push({role: "assistant", content: parts.filter((p) => p.part === "text").map((p) => p.text).join(""),
                     ...(calls ? {tool_calls: calls.map(({index, ...c}) => c)} : {})});
  if (finish === "length" || finish === "stopped")
    msg.appendChild(el("div", "dim", finish === "length" ? "(cut at max tokens)" : "(stopped)"));
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = busy;
  if (!busy) $("input").focus();
}

function newChat() {
  if (controller) controller.abort();
  history = [];
  $("messages").replaceChildren();
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem("chatforge-key") || "";
  $("api-key").addEventListener("change", () => { sessionStorage.setItem("chatforge-key", $("api-key").value); loadModel(); });
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value;
    if (!text.trim() || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("new-chat").addEventListener("click", newChat);
  loadModel().catch((e) => { $("model").textContent = "cannot reach the server: " + e.message; });
});
