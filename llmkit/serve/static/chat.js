// llmkit chat page: streams /v1/chat/completions and renders replies as markdown.
// Model output is untrusted (OWASP LLM05): every piece of it becomes a DOM text node. No innerHTML anywhere,
// so a reply (or a message) holding <script> or <img onerror=...> is shown as those characters, never run.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"), reset: $("reset"),
    apiKey: $("api-key"), system: $("system-prompt"), status: $("model-status"),
    temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
  };
  let history = [];   // {role, content} of the conversation so far
  let model = null;   // the served model's id, from /v1/models
  let controller = null;  // aborts the streaming request: the server sees the disconnect and cancels it

  // ------------------------------------------------------------------ markdown -> DOM (text nodes only)

  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*\n]+)\*\*|__([^_\n]+)__|\*([^*\n]+)\*|_([^_\n]+)_|\[([^\]\n]+)\]\(([^)\s]+)\)/;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function safeUrl(url) {
    try {
      const parsed = new URL(url, window.location.href);
      return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
    } catch (e) {
      return null;
    }
  }

  function appendInline(parent, text) {
    while (text) {
      const m = INLINE.exec(text);
      if (!m) { parent.appendChild(document.createTextNode(text)); return; }
      if (m.index > 0) parent.appendChild(document.createTextNode(text.slice(0, m.index)));
      if (m[2] !== undefined) parent.appendChild(el("code", "", m[2]));
      else if (m[3] !== undefined || m[4] !== undefined) appendInline(parent.appendChild(el("strong")), m[3] || m[4]);
      else if (m[5] !== undefined || m[6] !== undefined) appendInline(parent.appendChild(el("em")), m[5] || m[6]);
      else {
        const href = safeUrl(m[8]);
        if (href) {
          const a = parent.appendChild(el("a", "", m[7]));
          a.href = href; a.target = "_blank"; a.rel = "noopener noreferrer nofollow";
        } else parent.appendChild(document.createTextNode(m[0]));
      }
      text = text.slice(m.index + m[0].length);
    }
  }

  function appendLines(parent, lines) {
    lines.forEach((line, i) => {
      if (i > 0) parent.appendChild(document.createElement("br"));
      appendInline(parent, line);
    });
  }

  // one block starting at lines[i]: returns [node, next line index]
  function block(lines, i) {
    const line = lines[i];
    const fence = /^\s*(```|~~~)\s*([\w+-]*)/.exec(line);
    if (fence) {
      let j = i + 1;
      while (j < lines.length && !lines[j].trim().startsWith(fence[1])) j++;
      const pre = el("pre"), code = el("code", fence[2] ? "language-" + fence[2] : "", lines.slice(i + 1, j).join("\n"));
      pre.appendChild(code);
      return [pre, j + 1];  // an unclosed fence (still streaming) runs to the end
    }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    if (heading) {
      const h = el("h" + Math.min(6, heading[1].length + 2));
      appendInline(h, heading[2]);
      return [h, i + 1];
    }
    const listKinds = [["ul", /^\s*[-*+]\s+(.*)$/], ["ol", /^\s*\d+[.)]\s+(.*)$/]];
    for (const [tag, re] of listKinds) {
      if (re.test(line)) {
        const list = el(tag);
        let j = i;
        for (let m; j < lines.length && (m = re.exec(lines[j])); j++) appendInline(list.appendChild(el("li")), m[1]);
        return [list, j];
      }
    }
    if (/^>\s?/.test(line)) {
      let j = i;
      while (j < lines.length && /^>\s?/.test(lines[j])) j++;
      const quote = el("blockquote");
      appendLines(quote, lines.slice(i, j).map((l) => l.replace(/^>\s?/, "")));
      return [quote, j];
    }
    let j = i;  // a paragraph: up to a blank line or the start of another block
    while (j < lines.length && lines[j].trim() && (j === i || !/^(\s*(```|~~~)|#{1,6}\s|\s*[-*+]\s|\s*\d+[.)]\s|>)/.test(lines[j]))) j++;
    const p = el("p");
    appendLines(p, lines.slice(i, j));
    return [p, j];
  }

  function renderMarkdown(text) {
    const fragment = document.createDocumentFragment();
    const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
    for (let i = 0; i < lines.length;) {
      if (!lines[i].trim()) { i++; continue; }
      const [node, next] = block(lines, i);
      fragment.appendChild(node);
      i = next;
    }
    return fragment;
  }

  // ------------------------------------------------------------------ the conversation

  function addMessage(role, text) {
    const node = el("div", "message " + role);
    if (role === "assistant") node.appendChild(renderMarkdown(text));
    else node.textContent = text;
    ui.messages.appendChild(node);
    ui.messages.scrollTop = ui.messages.scrollHeight;
    return node;
  }

  function showReply(node, text) {
    node.replaceChildren(renderMarkdown(text));
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function showCitations(node, citations) {
    if (!Array.isArray(citations) || !citations.length) return;
    const box = node.appendChild(el("div", "citations"));
    for (const c of citations) {
      box.appendChild(el("div", "", `[${c.n}] ${c.title || c.doc_id} (${c.source}${c.page ? ", page " + c.page : ""})`));
    }
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = ui.apiKey.value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      return `${response.status}: ${body.error.message}`;
    } catch (e) {
      return `HTTP ${response.status}`;
    }
  }

  function setStatus(text, isError) {
    ui.status.textContent = text;
    ui.status.classList.toggle("error", Boolean(isError));
  }

  async function loadModel() {
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      if (!response.ok) { setStatus(await errorText(response), true); return; }
      const card = (await response.json()).data[0];
      model = card.id;
      setStatus("model: " + model, false);
      if (card.max_model_len) {  // room for a prompt too: at most half the context by default
        ui.maxTokens.max = String(card.max_model_len - 1);
        if (Number(ui.maxTokens.value) > card.max_model_len / 2) ui.maxTokens.value = String(Math.floor(card.max_model_len / 2));
        $("max-tokens-value").textContent = ui.maxTokens.value;
      }
    } catch (e) {
      setStatus("cannot reach the server", true);
    }
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
  }

  // Server-Sent Events from a fetch body: "data: {json}" blocks separated by blank lines, ending "data: [DONE]"
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const data = buffer.slice(0, cut).split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        buffer = buffer.slice(cut + 2);
        if (data === "[DONE]") return;
        if (data) yield JSON.parse(data);
      }
    }
  }

  function requestBody() {
    const system = ui.system.value.trim();
    const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
    return {
      model: model || undefined, messages, stream: true,
      temperature: Number(ui.temperature.value), top_p: Number(ui.topP.value), max_tokens: Number(ui.maxTokens.value),
    };
  }

  async function send(text) {
    history.push({ role: "user", content: text });
    addMessage("user", text);
    const node = addMessage("assistant", "");
    let reply = "";
    controller = new AbortController();
    setBusy(true);
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorText(response));
      for await (const chunk of events(response)) {
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          showReply(node, reply);
        }
        if (chunk.citations) showCitations(node, chunk.citations);
      }
    } catch (e) {
      if (e.name !== "AbortError") addMessage("error", String(e.message || e));
    } finally {
      if (reply) history.push({ role: "assistant", content: reply });
      node.dataset.done = "true";
      controller = null;
      setBusy(false);
    }
  }

  // ------------------------------------------------------------------ controls

  for (const [input, outputId] of [[ui.temperature, "temperature-value"], [ui.topP, "top-p-value"],
                                   [ui.maxTokens, "max-tokens-value"]]) {
    input.addEventListener("input", () => { $(outputId).textContent = input.value; });
  }
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.input.value;
    if (!text.trim() || controller) return;
    ui.input.value = "";
    send(text);
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  ui.stop.addEventListener("click", () => { if (controller) controller.abort(); });
  ui.reset.addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    ui.messages.replaceChildren();
  });
  ui.apiKey.addEventListener("change", loadModel);

  window.llmkitChat = { renderMarkdown };  // for tests and the console
  loadModel();
})();
