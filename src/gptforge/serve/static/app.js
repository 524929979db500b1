// gptforge chat page: streams /v1/chat/completions (server-sent events) with fetch; no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} turns of this conversation
let controller = null;  // AbortController of the reply being streamed
let modelName = null;
let contextLength = null;  // the model's max_model_len, from /v1/models

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (e) {
    return `${response.status}: ${response.statusText}`;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      $("model-name").textContent = "enter your API key";
      showError($("api-key").value.trim() ? "That API key was not accepted; check it and press Enter."
                                          : "This server needs an API key: enter it under Settings.");
      $("api-key").focus();
      return;
    }
    if (!response.ok) { $("model-name").textContent = await errorText(response); return; }
    const body = await response.json();
    modelName = body.data[0].id;
    contextLength = body.data[0].max_model_len || null;
    $("model-name").textContent = modelName;
    showError("");
  } catch (e) {
    $("model-name").textContent = "server unreachable";
  }
}

async function countTokens(messages) {
  const response = await fetch("/tokenize", {
    method: "POST", headers: headers(), body: JSON.stringify({ model: modelName, messages }),
  });
  if (!response.ok) throw new Error(await errorText(response));
  return (await response.json()).count;
}

// The messages and max_tokens that fit the context: the oldest turns are left out first, then the reply
// budget is clipped (a small model's context fills after a few turns).
async function fitToContext(system, maxTokens) {
  let turns = history.slice();
  let dropped = 0;
  for (;;) {
    const messages = system.concat(turns);
    if (!contextLength) return { messages, maxTokens, dropped };
    const used = await countTokens(messages);
    if (used + maxTokens <= contextLength) return { messages, maxTokens, dropped };
    if (turns.length > 1) { turns = turns.slice(turns[1].role === "assistant" ? 2 : 1); dropped++; continue; }
    const left = contextLength - used;
    if (left < 1) throw new Error(`This message is too long for the model's ${contextLength}-token context.`);
    return { messages, maxTokens: left, dropped };
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  showError("");
  if (!modelName) await loadModel();
  if (!modelName) { showError("model not available: check the API key"); return; }
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  const systemText = $("system-prompt").value.trim();
  const system = systemText ? [{ role: "system", content: systemText }] : [];
  controller = new AbortController();
  setBusy(true);
  let content = "";
  try {
    const fit = await fitToContext(system, Math.max(1, Number($("max-tokens").value) || 1));
    if (fit.dropped) {
      showError(`Older messages were left out so the conversation fits the model's ${contextLength}-token context.`);
    }
    const body = {
      model: modelName, messages: fit.messages, stream: true,
      temperature: Number($("temperature").value), top_p: Number($("top-p").value), max_tokens: fit.maxTokens,
    };
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) {
              content += choice.delta.content;
              reply.textContent = content;
              reply.scrollIntoView({ block: "end" });
            }
            if (choice.finish_reason) reply.dataset.finishReason = choice.finish_reason;
          }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      reply.dataset.finishReason = "stopped";
    } else {
      showError(String(e.message || e));
      if (!content) reply.textContent = "(no reply: see the message above)";
    }
  } finally {
    reply.classList.remove("streaming");
    reply.dataset.done = "true";
    if (content) history.push({ role: "assistant", content });
    else history.pop();  // the failed turn is not kept: the next message is not stuck behind it
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => { history.length = 0; $("messages").textContent = ""; showError(""); });
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("gptforge-api-key", $("api-key").value);
  modelName = null;
  loadModel();
});
$("api-key").value = sessionStorage.getItem("gptforge-api-key") || "";
loadModel();
