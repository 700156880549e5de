// The chat page of `python -m vlm.serve`: one session per tab, pictures for the first question, streamed answers.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { session: null, info: null, pictures: [], turns: 0, uploads: 0, answer: null };

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function refreshControls() {
  const ready = state.session !== null;
  const busy = state.answer !== null || state.uploads > 0;
  $("prompt").disabled = !ready;
  $("send").disabled = !ready || busy;
  $("reset").disabled = !ready;
  $("pictures").disabled = !ready || state.turns > 0 || state.answer !== null;
  $("tray").hidden = state.turns > 0;  // from the first question on, its pictures show in its message
}

async function api(path, body, headers = { "Content-Type": "application/json" }) {
  const response = await fetch(path, { method: "POST", headers, body });
  const reply = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(reply.error || `${response.status} ${response.statusText}`);
  return reply;
}

function addMessage(role, text, pictures = []) {
  const message = document.createElement("div");
  message.className = `message ${role}`;
  for (const url of pictures) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "uploaded picture";
    message.append(img, document.createElement("br"));
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  message.append(body);
  $("messages").append(message);
  message.scrollIntoView({ block: "end" });
  return body;
}

async function uploadPicture(file) {
  if (file.size > state.info.max_upload_bytes) {
    throw new Error(`${file.name} is ${file.size.toLocaleString()} bytes; the limit is ` +
                    `${state.info.max_upload_bytes.toLocaleString()}`);
  }
  const query = `?session=${encodeURIComponent(state.session)}`;
  try {
    await api(`/api/picture${query}`, file, { "Content-Type": file.type || "application/octet-stream" });
  } catch (err) {
    throw new Error(`${file.name}: ${err.message}`);
  }
  const url = URL.createObjectURL(file);
  state.pictures.push(url);
  const img = document.createElement("img");
  img.src = url;
  img.alt = file.name;
  img.title = file.name;
  $("tray").append(img);
}

async function onPictures(event) {
  const files = Array.from(event.target.files);
  event.target.value = "";
  showError("");
  state.uploads += 1;
  refreshControls();
  try {
    for (const file of files) await uploadPicture(file);
  } catch (err) {
    showError(err.message);
  } finally {
    state.uploads -= 1;
    refreshControls();
  }
}

async function readAnswer(response, bubble) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = JSON.parse(buffer.slice(0, newline));
      buffer = buffer.slice(newline + 1);
      if (line.text !== undefined) bubble.textContent += line.text;
      if (line.error !== undefined) throw new Error(line.error);
      if (line.done) {
        bubble.textContent = line.reply.trim() ? line.reply : "(the model gave an empty answer)";
        return;
      }
    }
  }
  throw new Error("the answer was cut off (did the server stop?)");
}

async function onAsk(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || state.answer !== null || state.uploads > 0) return;
  showError("");
  addMessage("user", prompt, state.turns === 0 ? state.pictures : []);
  $("prompt").value = "";
  const bubble = addMessage("assistant", "");
  const message = bubble.parentElement;
  message.dataset.state = "streaming";
  const answer = (state.answer = new AbortController());
  state.turns += 1;
  refreshControls();
  try {
    const response = await fetch("/api/ask", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal: answer.signal,
      body: JSON.stringify({ session: state.session, prompt }),
    });
    if (!response.ok) {
      const reply = await response.json().catch(() => ({}));
      throw new Error(reply.error || `${response.status} ${response.statusText}`);
    }
    await readAnswer(response, bubble);
    message.dataset.state = "done";
  } catch (err) {
    if (answer.signal.aborted) return;
    message.dataset.state = "failed";
    if (!bubble.textContent) {  // nothing was answered: the question did not count
      message.previousElementSibling.remove();
      message.remove();
      state.turns -= 1;
    }
    showError(err.message);
  } finally {
    if (state.answer === answer) state.answer = null;
    refreshControls();
  }
}

async function onReset() {
  if (state.answer !== null) state.answer.abort();  // the server stops generating when the tab hangs up
  state.answer = null;
  showError("");
  try {
    await api("/api/reset", JSON.stringify({ session: state.session }));
  } catch (err) {
    showError(err.message);
    return;
  }
  $("messages").replaceChildren();
  $("tray").replaceChildren();
  state.pictures.forEach((url) => URL.revokeObjectURL(url));
  state.pictures = [];
  state.turns = 0;
  refreshControls();
  $("prompt").focus();
}

async function start() {
  try {
    const response = await fetch("/api/info");
    state.info = await response.json();
    $("source").textContent = `model: ${state.info.source} · up to ${state.info.max_pictures} pictures, ` +
                              `${(state.info.max_upload_bytes / 1048576).toFixed(0)} MB each`;
    $("pictures").accept = ["image/*", ...state.info.extensions.map((ext) => `.${ext}`)].join(",");
    state.session = (await api("/api/session", "{}")).session;
  } catch (err) {
    showError(`cannot reach the chat server: ${err.message}`);
  }
  refreshControls();
  document.body.dataset.ready = state.session !== null ? "yes" : "no";
}

$("pictures").addEventListener("change", onPictures);
$("ask").addEventListener("submit", onAsk);
$("reset").addEventListener("click", onReset);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
start();
