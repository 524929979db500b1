// gptforge chat page: streams /v1/chat/completions (server-sent events) with fetch; no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} turns of this conversation
let controller = null;  // AbortController of the reply being streamed
let modelName = null;
let contextLength = null;  // the model's max_model_len, from /v1/models
let feedbackOn = false;  // GET /v1/feedback says the server stores ratings: the page shows its buttons

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
    await loadFeedbackSettings();
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

// ---- feedback: thumbs, a better answer, and the better of two answers (POST /v1/feedback) ----------

async function loadFeedbackSettings() {
  let on = false;
  try {
    const response = await fetch("/v1/feedback", { headers: headers() });
    on = response.ok && (await response.json()).enabled === true;
  } catch (e) { on = false; }
  feedbackOn = on;
  $("compare-label").hidden = !on;
}

// A thumb drawn inline (emoji fonts are missing on many servers and kiosks); thumbs down is it turned over.
const THUMB = '<svg viewBox="0 0 24 24" width="16" height="16" aria-hidden="true"><path fill="currentColor" ' +
  'd="M2 10h4v11H2zM8 10l4-7c1.5 0 2.5 1 2 3l-1 3h7c1.1 0 2 1 1.8 2L20 19c-.3 1.2-1.2 2-2.4 2H8z"/></svg>';

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Feedback about the response id. The server keeps a streamed response once its stream has ended, so a
// click right after the last token may arrive first: retry briefly, then (also once the server's
// retention has passed) send the conversation and the answers themselves.
async function postFeedback(turn, fields) {
  const post = (body) => fetch("/v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  let response = null;
  for (const wait of [0, 200, 800]) {
    if (!turn.responseId) break;
    await sleep(wait);
    response = await post(Object.assign({ id: turn.responseId }, fields));
    if (response.status !== 404) break;
    const body = await response.clone().json().catch(() => ({}));
    if (!(body.error && body.error.code === "response_not_found")) break;
  }
  if (!response || response.status === 404) {
    response = await post(Object.assign({ model: modelName, messages: turn.messages, completions: turn.answers },
                                        fields));
  }
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

function button(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.setAttribute("aria-label", title);
  b.addEventListener("click", onClick);
  return b;
}

// One feedback post for a control: its buttons disabled while it runs, the outcome shown beside them.
async function submit(box, buttons, fields, turn, done) {
  const status = box.querySelector(".status");
  buttons.forEach((b) => { b.disabled = true; });
  status.textContent = "saving…";
  try {
    const saved = await postFeedback(turn, fields);
    status.textContent = "Thanks, saved.";
    box.dataset.sent = String(Number(box.dataset.sent || 0) + 1);
    box.dataset.lastKinds = saved.kinds.join(" ");
    if (done) done(saved);
  } catch (e) {
    status.textContent = "";
    showError("Feedback was not saved: " + String(e.message || e));
    buttons.forEach((b) => { b.disabled = false; });
  }
}

// The controls under one answer: thumbs up/down, a "better answer" box, and (in a pair) "A/B is better".
function addFeedbackControls(turn, index) {
  const box = document.createElement("div");
  box.className = "feedback";
  const status = document.createElement("span");
  status.className = "status";
  const thumbs = [];
  const rate = (rating, b) => () => submit(box, thumbs, { choice_index: index, rating }, turn,
                                           () => b().classList.add("selected"));
  const up = button("", "Good answer", rate(1, () => up));
  const down = button("", "Bad answer", rate(-1, () => down));
  up.classList.add("thumb-up");
  down.classList.add("thumb-down");
  up.innerHTML = down.innerHTML = THUMB;
  thumbs.push(up, down);
  const form = document.createElement("form");
  const edit = button("Better answer…", "Write a better answer", () => { form.hidden = !form.hidden; });
  edit.classList.add("edit-toggle");
  box.append(up, down, edit);
  if (turn.answers.length === 2 && turn.answers.every(Boolean)) {  // (a stopped stream may leave one empty)
    const pick = button(`${"AB"[index]} is better`, `Answer ${"AB"[index]} is the better one`, () => {
      const picks = turn.wrappers.map((w) => w.querySelector(".pick"));
      submit(box, picks, { chosen_index: index }, turn, () => {
        turn.wrappers.forEach((w, i) => w.classList.add(i === index ? "chosen" : "rejected"));
        if (history.includes(turn.historyEntry)) turn.historyEntry.content = turn.answers[index];
      });
    });
    pick.classList.add("pick");
    box.append(pick);
  }
  box.append(status);
  form.className = "edit";
  form.hidden = true;
  const text = document.createElement("textarea");
  text.rows = 3;
  text.value = turn.answers[index];
  text.setAttribute("aria-label", "A better answer");
  const save = document.createElement("button");
  save.type = "submit";
  save.textContent = "Save better answer";
  const row = document.createElement("div");
  row.append(save, button("Cancel", "Close without saving", () => { form.hidden = true; }));
  form.append(text, row);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const better = text.value.trim();
    if (!better) { showError("Write the better answer first, or press Cancel."); return; }
    submit(box, [save], { choice_index: index, edited: better }, turn, () => { form.hidden = true; edit.disabled = true; });
  });
  turn.wrappers[index].append(box, form);
}

// One answer box (or two side by side, labelled A and B), each in a wrapper that later gets its controls.
function addAnswers(count) {
  const wrappers = [], replies = [];
  for (let i = 0; i < count; i++) {
    const wrapper = document.createElement("div");
    wrapper.className = "answer";
    const reply = document.createElement("div");
    reply.className = "message assistant streaming";
    if (count > 1) reply.dataset.label = "Answer " + "AB"[i];
    wrapper.appendChild(reply);
    wrappers.push(wrapper);
    replies.push(reply);
  }
  let outer = wrappers[0];
  if (count > 1) {
    outer = document.createElement("div");
    outer.className = "pair";
    outer.append(...wrappers);
  }
  $("messages").appendChild(outer);
  outer.scrollIntoView({ block: "end" });
  return { wrappers, replies };
}

// ---- sending a message and streaming the reply (or two) ---------------------------------------------

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Reads a chat completion's server-sent events into `turn` (the text of each choice, the response id).
async function readStream(response, turn) {
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
        turn.responseId = turn.responseId || chunk.id;
        for (const choice of chunk.choices || []) {
          const reply = turn.replies[choice.index];
          if (!reply) continue;
          if (choice.delta && choice.delta.content) {
            turn.answers[choice.index] += choice.delta.content;
            reply.textContent = turn.answers[choice.index];
            reply.scrollIntoView({ block: "end" });
          }
          if (choice.finish_reason) reply.dataset.finishReason = choice.finish_reason;
        }
      }
    }
  }
}

async function send(text) {
  showError("");
  if (!modelName) await loadModel();
  if (!modelName) { showError("model not available: check the API key"); return; }
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const count = feedbackOn && $("compare").checked ? 2 : 1;
  const turn = Object.assign(addAnswers(count), { answers: Array(count).fill(""), responseId: null, messages: null });
  const systemText = $("system-prompt").value.trim();
  const system = systemText ? [{ role: "system", content: systemText }] : [];
  controller = new AbortController();
  setBusy(true);
  try {
    const fit = await fitToContext(system, Math.max(1, Number($("max-tokens").value) || 1));
    if (fit.dropped) {
      showError(`Older messages were left out so the conversation fits the model's ${contextLength}-token context.`);
    }
    turn.messages = fit.messages;
    const body = {
      model: modelName, messages: fit.messages, stream: true, n: count,
      temperature: Number($("temperature").value), top_p: Number($("top-p").value), max_tokens: fit.maxTokens,
    };
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readStream(response, turn);
  } catch (e) {
    if (e.name === "AbortError") {
      turn.replies.forEach((r) => { r.dataset.finishReason = "stopped"; });
    } else {
      showError(String(e.message || e));
      turn.replies.forEach((r, i) => { if (!turn.answers[i]) r.textContent = "(no reply: see the message above)"; });
    }
  } finally {
    turn.replies.forEach((r) => { r.classList.remove("streaming"); r.dataset.done = "true"; });
    if (turn.responseId) turn.wrappers.forEach((w) => { w.dataset.responseId = turn.responseId; });
    if (turn.answers[0]) {
      turn.historyEntry = { role: "assistant", content: turn.answers[0] };  // a pick puts the better one here
      history.push(turn.historyEntry);
      if (feedbackOn) turn.answers.forEach((answer, i) => { if (answer) addFeedbackControls(turn, i); });
    } else {
      history.pop();  // the failed turn is not kept: the next message is not stuck behind it
    }
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
