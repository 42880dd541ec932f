// chattune's web page: chat with a served model, one prompt to two models side by side, and
// the runs (summary, data audit, evaluations, training curves that grow while training
// writes). Everything goes through the server's own routes: /v1/models, streamed
// /v1/chat/completions, /ui/api/runs. No secret is in the page: with an API key the page
// asks for it and keeps it in memory, or in localStorage when "remember" is ticked.
// A chat message may carry images (to a model that reads them): each is read in the browser
// as a data: URL (scaled down when too large to send as it is) and sent as an image_url part.
// Under `chattune workbench` the page also has a Train view (workbench.js, loaded after this
// file: it shares these globals, adds its strings to TEXT and follows the page through `hooks`).
"use strict";

const STORE = {
  chat: "chattune.chat",          // {messages: [{role, content, model?, images?}], system}
  settings: "chattune.settings",  // {model, temperature, top_p, max_tokens, stop, left, right}
  lang: "chattune.lang",
  key: "chattune.key",            // only with "remember"
};

const TEXT = {
  en: {
    tab_chat: "Chat", tab_compare: "Side by side", tab_runs: "Runs", tab_train: "Train", model: "Model",
    system_prompt: "System prompt", system_placeholder: "Optional: sent first, as the system message",
    temperature: "Temperature", max_tokens: "Max tokens", stop: "Stop",
    stop_placeholder: "comma-separated stop strings", settings_note: "These settings apply to the side-by-side view too.",
    input_placeholder: "Type a message; Enter sends, Shift+Enter is a new line",
    send: "Send", stop_generating: "Stop", regenerate: "Regenerate", clear: "Clear", copy: "Copy", copied: "Copied",
    compare_placeholder: "One prompt, sent to both models", send_both: "Send to both",
    runs: "Runs", run: "Run", state: "State", method: "Method", template: "Template", served_as: "Served as",
    curves: "Training curves", evaluations: "Evaluations", audit: "Data audit",
    key_title: "This server needs an API key", key_placeholder: "API key", remember: "Remember on this browser",
    key_use: "Use key", key_change: "API key", key_wrong: "The server refused this key (401). Check it and try again.",
    you: "You", no_models: "no models", loading: "loading…", empty_chat: "Start the conversation below.",
    no_runs: "No runs to show.", runs_dir: "Also listing runs under", none: "none",
    no_manifest: "No manifest yet: the run is still training (it is written at the first checkpoint).",
    no_evals: "No evaluation yet: chattune eval RUN --data FILE", no_audit: "No data audit in this run folder.",
    rows_logged: "rows logged", last_step: "last step", updating: "updating while training writes",
    state_finished: "finished", state_training: "training", state_incomplete: "incomplete",
    loss: "Loss", learning_rate: "Learning rate", tokens_per_second: "Tokens / s", no_data: "no data yet",
    stage: "Stage", reference: "Reference", rewards: "Rewards (chosen, rejected)", reward_accuracy: "Reward accuracy",
    reward_margin: "Reward margin", kl: "KL estimate (KTO, GRPO)", grpo_reward: "Reward (GRPO: sum, per function)",
    completion_length: "Completion length (tokens)", completions_per_second: "Completions sampled / s",
    error: "Error", models: "models", sources: "Sources", chunk: "chunk",
    attach_image: "Image", attach_title: "Attach an image (PNG, JPEG, WebP, GIF or BMP); pasting one works too",
    no_vision: "This model reads no images", remove: "Remove", image_alt: "attached image",
    image_type: "not an image the model can read (PNG, JPEG, WebP, GIF or BMP)",
    image_unreadable: "the browser cannot read this image", image_too_big: "too large to send, even scaled down",
    images_not_kept: "image not kept: the browser's storage is full",
  },
  zh: {
    tab_chat: "对话", tab_compare: "并排对比", tab_runs: "训练记录", tab_train: "训练", model: "模型",
    system_prompt: "系统提示词", system_placeholder: "可选：作为 system 消息最先发送",
    temperature: "温度", max_tokens: "最大生成长度", stop: "停止词",
    stop_placeholder: "多个停止词用逗号分隔", settings_note: "这些设置也用于并排对比。",
    input_placeholder: "输入消息；Enter 发送，Shift+Enter 换行",
    send: "发送", stop_generating: "停止", regenerate: "重新生成", clear: "清空", copy: "复制", copied: "已复制",
    compare_placeholder: "同一个问题，发给两个模型", send_both: "同时发送",
    runs: "训练记录", run: "运行", state: "状态", method: "方法", template: "模板", served_as: "服务名",
    curves: "训练曲线", evaluations: "评测结果", audit: "数据审计",
    key_title: "此服务需要 API 密钥", key_placeholder: "API 密钥", remember: "在此浏览器中记住",
    key_use: "使用密钥", key_change: "API 密钥", key_wrong: "服务器拒绝了这个密钥 (401)，请检查后重试。",
    you: "你", no_models: "没有模型", loading: "加载中…", empty_chat: "在下方开始对话。",
    no_runs: "没有可显示的运行。", runs_dir: "同时列出此目录下的运行：", none: "无",
    no_manifest: "还没有 manifest：仍在训练中（第一个检查点时写入）。",
    no_evals: "还没有评测：chattune eval RUN --data FILE", no_audit: "此运行目录中没有数据审计。",
    rows_logged: "行已记录", last_step: "最新步数", updating: "训练写入时自动更新",
    state_finished: "已完成", state_training: "训练中", state_incomplete: "未完成",
    loss: "损失", learning_rate: "学习率", tokens_per_second: "每秒 token 数", no_data: "暂无数据",
    stage: "训练阶段", reference: "参考模型", rewards: "奖励（chosen、rejected）", reward_accuracy: "奖励准确率",
    reward_margin: "奖励差值", kl: "KL 估计（KTO、GRPO）", grpo_reward: "奖励（GRPO：总和、各函数）",
    completion_length: "生成长度（token）", completions_per_second: "每秒采样的回答数",
    error: "错误", models: "个模型", sources: "出处", chunk: "片段",
    attach_image: "图片", attach_title: "附加图片（PNG、JPEG、WebP、GIF 或 BMP），也可以直接粘贴",
    no_vision: "此模型不读取图片", remove: "移除", image_alt: "附加的图片",
    image_type: "不是模型能读取的图片（PNG、JPEG、WebP、GIF 或 BMP）",
    image_unreadable: "浏览器无法读取这张图片", image_too_big: "图片太大，缩小后仍无法发送",
    images_not_kept: "图片未保存：浏览器存储空间已满",
  },
};

const $ = (selector) => document.querySelector(selector);
const state = {
  lang: localStorage.getItem(STORE.lang) || ((navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en"),
  key: localStorage.getItem(STORE.key),
  models: [],
  cards: {},           // model id -> its /v1/models card
  pending: [],         // data: URLs of the images attached to the next message
  chat: readJson(STORE.chat, {messages: [], system: ""}),
  settings: readJson(STORE.settings, {}),
  controller: null,
  keyWaiters: [],
  run: null,           // the run shown: {id, offset, rows, timer, stage, busy}
};

// what other scripts of the page (workbench.js) run when the view or the language changes
const hooks = {view: [], language: []};

function readJson(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value && typeof value === "object" ? value : fallback;
  } catch (_) {
    return fallback;
  }
}

function t(key) {
  return (TEXT[state.lang] && TEXT[state.lang][key]) || TEXT.en[key] || key;
}

function applyLanguage() {
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  document.querySelectorAll("[data-i18n-title]").forEach((el) => { el.title = t(el.dataset.i18nTitle); });
  $("#lang-button").textContent = state.lang === "zh" ? "English" : "中文";
  updateAttach();
  renderAttachments();
  renderMessages();
  if (state.run) showRun(state.run.id, true);
  hooks.language.forEach((hook) => hook());
}

// ---------------------------------------------------------------- the server's routes

class KeyNeeded extends Error {}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

// fetch a route; on 401 ask for the key and try again once it is given
async function call(path, options) {
  for (;;) {
    const response = await fetch(path, Object.assign({}, options, {headers: headers(options && options.headers)}));
    if (response.status !== 401) return response;
    await askForKey(state.key ? t("key_wrong") : null);
  }
}

async function getJson(path) {
  const response = await call(path);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

function askForKey(message) {
  const dialog = $("#key-dialog");
  const note = $("#key-message");
  note.hidden = !message;
  note.textContent = message || "";
  $("#key-input").value = "";
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
  return new Promise((resolve) => state.keyWaiters.push(resolve));
}

function useKey(event) {
  event.preventDefault();
  const key = $("#key-input").value.trim();
  if (!key) return;
  state.key = key;
  if ($("#key-remember").checked) localStorage.setItem(STORE.key, key);
  else localStorage.removeItem(STORE.key);
  $("#key-dialog").close();
  $("#key-button").hidden = false;
  const waiters = state.keyWaiters.splice(0);
  waiters.forEach((resolve) => resolve());
}

// POST a streamed chat completion; onText gets the text so far as each piece arrives, onSources
// the sources of an answer from a knowledge base (a model RUN+KB); returns the whole text
async function streamChat(model, messages, onText, signal, onSources) {
  const s = readSettings();
  const body = {model, messages, stream: true, temperature: s.temperature, top_p: s.top_p, max_tokens: s.max_tokens};
  if (s.stop.length) body.stop = s.stop;
  const response = await call("/v1/chat/completions", {
    method: "POST", body: JSON.stringify(body), signal, headers: {"Content-Type": "application/json"},
  });
  if (!response.ok) throw new Error(await errorText(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return text;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        if (chunk.sources && onSources) onSources(chunk.sources);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          text += delta.content;
          onText(text);
        }
      }
    }
  }
  return text;
}

// ---------------------------------------------------------------- settings and models

function readSettings() {
  const number = (id, fallback) => {
    const value = parseFloat($(id).value);
    return Number.isFinite(value) ? value : fallback;
  };
  return {
    temperature: number("#temperature", 0.7),
    top_p: number("#top-p", 1),
    max_tokens: Math.max(1, Math.round(number("#max-tokens", 256))),
    stop: $("#stop").value.split(",").map((x) => x.trim()).filter(Boolean),
  };
}

function saveSettings() {
  const s = readSettings();
  localStorage.setItem(STORE.settings, JSON.stringify({
    temperature: s.temperature, top_p: s.top_p, max_tokens: s.max_tokens, stop: $("#stop").value,
    model: $("#chat-model").value, left: $("#compare-left").value, right: $("#compare-right").value,
  }));
}

function restoreSettings() {
  const s = state.settings;
  if (s.temperature !== undefined) $("#temperature").value = s.temperature;
  if (s.top_p !== undefined) $("#top-p").value = s.top_p;
  if (s.max_tokens !== undefined) $("#max-tokens").value = s.max_tokens;
  if (s.stop !== undefined) $("#stop").value = s.stop;
  $("#system-prompt").value = state.chat.system || "";
}

async function loadModels() {
  $("#status").textContent = t("loading");
  const body = await getJson("/v1/models");
  state.models = body.data.map((m) => m.id);
  state.cards = Object.fromEntries(body.data.map((m) => [m.id, m]));
  const fill = (select, wanted, fallback) => {
    select.innerHTML = "";
    state.models.forEach((id) => {
      const option = document.createElement("option");
      option.value = option.textContent = id;
      select.appendChild(option);
    });
    select.value = state.models.includes(wanted) ? wanted : fallback;
  };
  const first = state.models[0] || "";
  const base = state.models.includes("base") ? "base" : state.models[state.models.length - 1] || "";
  fill($("#chat-model"), state.settings.model, first);
  fill($("#compare-left"), state.settings.left, base);
  fill($("#compare-right"), state.settings.right, first);
  updateAttach();
  $("#status").textContent = state.models.length ? state.models.length + " " + t("models") : t("no_models");
}

// ---------------------------------------------------------------- chat

function saveChat() {
  state.chat.system = $("#system-prompt").value;
  try {
    localStorage.setItem(STORE.chat, JSON.stringify(state.chat));
  } catch (_) {  // the browser's storage is full (images take room): the conversation is kept without them
    const messages = state.chat.messages.map((m) => (m.images && m.images.length
      ? Object.assign({}, m, {images: [], imagesDropped: m.images.length}) : m));
    try {
      localStorage.setItem(STORE.chat, JSON.stringify(Object.assign({}, state.chat, {messages})));
    } catch (_) {
      localStorage.removeItem(STORE.chat);
    }
  }
}

// ---------------------------------------------------------------- images

const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"];
const IMAGE_DATA_URL = /^data:image\/(png|jpeg|webp|gif|bmp);base64,/;
// an image is sent as it is when its data: URL is at most MAX_IMAGE_CHARS long, else scaled down as
// JPEG (MAX_IMAGE_SIDE pixels at most) until it is: the server takes 1 MiB bodies by default, and
// every image of the conversation goes with each request
const MAX_IMAGE_CHARS = 400000;
const MAX_IMAGE_SIDE = 1536;

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("unreadable"));
    image.src = url;
  });
}

// the data: URL a file is sent as: the file itself when small enough, else scaled down as JPEG;
// an Error naming the file when it is no image the model reads or the browser cannot decode it
async function imageDataUrl(file) {
  if (!IMAGE_TYPES.includes(file.type)) throw new Error(file.name + ": " + t("image_type"));
  const url = await readFile(file);
  if (!IMAGE_DATA_URL.test(url)) throw new Error(file.name + ": " + t("image_type"));
  let image;
  try {
    image = await loadImage(url);
  } catch (_) {
    throw new Error(file.name + ": " + t("image_unreadable"));
  }
  if (url.length <= MAX_IMAGE_CHARS) return url;
  const width = image.naturalWidth, height = image.naturalHeight;
  const canvas = document.createElement("canvas");
  for (let side = Math.min(MAX_IMAGE_SIDE, Math.max(width, height)); side >= 64; side = Math.floor(side * 0.75)) {
    const scale = side / Math.max(width, height);
    canvas.width = Math.max(1, Math.round(width * scale));
    canvas.height = Math.max(1, Math.round(height * scale));
    const context = canvas.getContext("2d");
    context.fillStyle = "#fff";  // JPEG has no transparency
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.drawImage(image, 0, 0, canvas.width, canvas.height);
    const scaled = canvas.toDataURL("image/jpeg", 0.88);
    if (scaled.length <= MAX_IMAGE_CHARS) return scaled;
  }
  throw new Error(file.name + ": " + t("image_too_big"));
}

function showChatError(text) {
  const box = $("#chat-error");
  box.textContent = text || "";
  box.hidden = !text;
}

async function attachFiles(files) {
  const errors = [];
  for (const file of files) {
    try {
      state.pending.push(await imageDataUrl(file));
    } catch (error) {
      errors.push(error.message);
    }
  }
  showChatError(errors.join("\n"));
  renderAttachments();
}

// an <img> of an image's data: URL (nothing else is ever put in its src)
function thumbnail(url) {
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = t("image_alt");
  if (typeof url === "string" && IMAGE_DATA_URL.test(url)) img.src = url;
  return img;
}

function renderAttachments() {
  const box = $("#attachments");
  box.innerHTML = "";
  state.pending.forEach((url, i) => {
    const item = document.createElement("div");
    item.className = "attachment";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove small";
    remove.textContent = "×";
    remove.title = t("remove");
    remove.addEventListener("click", () => {
      state.pending.splice(i, 1);
      renderAttachments();
    });
    item.append(thumbnail(url), remove);
    box.appendChild(item);
  });
  box.hidden = !state.pending.length;
}

// the attach button works for a model that reads images (its /v1/models card says so)
function updateAttach() {
  const card = state.cards[$("#chat-model").value];
  const vision = Boolean(card && card.vision);
  $("#attach").disabled = !vision;
  $("#attach").title = vision ? t("attach_title") : t("no_vision");
}

// a message's content as the API takes it: its text, or its images then its text as content parts
// (a model that reads no images, or images no longer stored, gets the text with "[image]" marks)
function apiContent(message, vision) {
  const images = message.images || [];
  if (!images.length || !vision) {
    const count = message.imagesDropped || images.length;
    return count ? ("[image] ".repeat(count) + (message.content || "")).trim() : message.content;
  }
  const parts = images.map((url) => ({type: "image_url", image_url: {url}}));
  if (message.content) parts.push({type: "text", text: message.content});
  return parts;
}

function copyText(text, button) {
  const done = () => { button.textContent = t("copied"); setTimeout(() => { button.textContent = t("copy"); }, 1500); };
  // a hidden textarea and the copy command first: it works within the click on any page;
  // the asynchronous clipboard API (secure pages only) where the command is refused
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  let copied = false;
  try {
    copied = document.execCommand("copy");
  } catch (_) {
    copied = false;
  }
  area.remove();
  if (copied) done();
  else if (navigator.clipboard) navigator.clipboard.writeText(text).then(done, () => {});
}

function messageElement(message) {
  const el = document.createElement("div");
  el.className = "msg " + message.role + (message.role === "assistant" ? " done" : "");
  const head = document.createElement("div");
  head.className = "who";
  head.textContent = message.role === "user" ? t("you") : (message.model || "assistant");
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy small";
  copy.textContent = t("copy");
  copy.addEventListener("click", () => copyText(el.dataset.raw, copy));
  head.appendChild(copy);
  const content = document.createElement("div");
  content.className = "content";
  el.appendChild(head);
  if ((message.images && message.images.length) || message.imagesDropped) {
    const images = document.createElement("div");
    images.className = "images";
    (message.images || []).forEach((url) => images.appendChild(thumbnail(url)));
    if (message.imagesDropped && !(message.images && message.images.length)) {
      images.className += " dim small-text";
      images.textContent = t("images_not_kept");
    }
    el.appendChild(images);
  }
  el.appendChild(content);
  setContent(el, message);
  return el;
}

function setContent(el, message) {
  el.dataset.raw = message.content;
  const content = el.querySelector(".content");
  if (message.role === "assistant") content.innerHTML = Markdown.render(message.content);
  else content.textContent = message.content;
  if (message.sources && message.sources.length) content.appendChild(sourcesElement(message.sources));
  if (message.error) {
    const error = document.createElement("div");
    error.className = "error";
    error.textContent = t("error") + ": " + message.error;
    content.appendChild(error);
  }
}

// the knowledge-base chunks an answer cites: [n] file, chunk c (score s)
function sourcesElement(sources) {
  const list = document.createElement("ol");
  list.className = "sources";
  list.title = t("sources");
  sources.forEach((source) => {
    const item = document.createElement("li");
    item.textContent = source.file + ", " + t("chunk") + " " + source.chunk + " (" + Number(source.score).toFixed(3) + ")";
    list.appendChild(item);
  });
  return list;
}

function renderMessages() {
  const box = $("#messages");
  box.innerHTML = "";
  if (!state.chat.messages.length) {
    const empty = document.createElement("p");
    empty.className = "dim empty";
    empty.textContent = t("empty_chat");
    box.appendChild(empty);
  }
  state.chat.messages.forEach((m) => box.appendChild(messageElement(m)));
  box.scrollTop = box.scrollHeight;
}

function conversationFor(messages) {
  const system = $("#system-prompt").value.trim();
  const card = state.cards[$("#chat-model").value];
  const vision = Boolean(card && card.vision);
  const history = messages.filter((m) => !m.error || m.content)
    .map((m) => ({role: m.role, content: m.role === "user" ? apiContent(m, vision) : m.content}));
  return system ? [{role: "system", content: system}, ...history] : history;
}

function setBusy(busy) {
  $("#send").disabled = busy;
  $("#regenerate").disabled = busy;
  $("#clear").disabled = busy;
  $("#stop-button").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

async function answerLast() {
  const model = $("#chat-model").value;
  const history = conversationFor(state.chat.messages);
  const reply = {role: "assistant", content: "", model};
  state.chat.messages.push(reply);
  renderMessages();
  const el = $("#messages").lastElementChild;
  el.classList.replace("done", "streaming");
  state.controller = new AbortController();
  setBusy(true);
  try {
    await streamChat(model, history, (text) => {
      reply.content = text;
      setContent(el, reply);
      $("#messages").scrollTop = $("#messages").scrollHeight;
    }, state.controller.signal, (sources) => { reply.sources = sources; });
    setContent(el, reply);
  } catch (error) {
    if (error.name !== "AbortError") {
      reply.error = error.message;
      setContent(el, reply);
    }
  } finally {
    el.classList.replace("streaming", "done");
    state.controller = null;
    setBusy(false);
    saveChat();
  }
}

async function send(event) {
  event.preventDefault();
  const input = $("#chat-input");
  const text = input.value.trim();
  if ((!text && !state.pending.length) || state.controller) return;
  input.value = "";
  const message = {role: "user", content: text};
  if (state.pending.length) {
    message.images = state.pending.splice(0);
    renderAttachments();
  }
  showChatError("");
  state.chat.messages.push(message);
  saveChat();
  await answerLast();
}

async function regenerate() {
  if (state.controller) return;
  const messages = state.chat.messages;
  while (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
  if (!messages.length) return;
  await answerLast();
}

function clearChat() {
  if (state.controller) return;
  state.chat.messages = [];
  saveChat();
  renderMessages();
}

// ---------------------------------------------------------------- side by side

async function compare(event) {
  event.preventDefault();
  const prompt = $("#compare-input").value.trim();
  if (!prompt) return;
  saveSettings();
  const messages = conversationFor([{role: "user", content: prompt}]);
  const sides = [["#compare-left", "#compare-left-out"], ["#compare-right", "#compare-right-out"]];
  $("#compare-send").disabled = true;
  await Promise.all(sides.map(async ([select, out]) => {
    const box = $(out);
    box.className = "answer streaming";
    box.dataset.raw = "";
    box.innerHTML = "";
    try {
      let sources = null;
      const text = await streamChat($(select).value, messages, (so) => {
        box.dataset.raw = so;
        box.innerHTML = Markdown.render(so);
      }, undefined, (found) => { sources = found; });
      box.dataset.raw = text;
      box.innerHTML = Markdown.render(text);
      if (sources && sources.length) box.appendChild(sourcesElement(sources));
    } catch (error) {
      box.innerHTML = "";
      const el = document.createElement("div");
      el.className = "error";
      el.textContent = t("error") + ": " + error.message;
      box.appendChild(el);
    }
    box.className = "answer done";
  }));
  $("#compare-send").disabled = false;
}

// ---------------------------------------------------------------- runs

function cell(value) {
  if (value === null || value === undefined || value === "") return "—";
  if (typeof value === "number") return Number.isInteger(value) ? value.toLocaleString("en") : value.toPrecision(5);
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function table(rows, className) {
  const el = document.createElement("table");
  el.className = className || "table kv";
  rows.forEach(([key, value]) => {
    const tr = el.insertRow();
    const th = document.createElement("th");
    th.textContent = key;
    tr.appendChild(th);
    const td = tr.insertCell();
    if (value && typeof value === "object" && !Array.isArray(value)) td.appendChild(table(Object.entries(value)));
    else td.textContent = cell(value);
  });
  return el;
}

async function loadRuns() {
  const body = await getJson("/ui/api/runs");
  const tbody = $("#runs-table tbody");
  tbody.innerHTML = "";
  body.runs.forEach((run) => {
    const tr = tbody.insertRow();
    tr.dataset.id = run.id;
    tr.className = "run-row" + (state.run && state.run.id === run.id ? " selected" : "");
    const m = run.manifest || {};
    const method = m.method && m.stage ? m.method + " · " + m.stage.name : m.method;
    [run.name, t("state_" + run.state), method, m.template, run.served_as.join(", ")].forEach((v) => {
      tr.insertCell().textContent = cell(v);
    });
    tr.title = run.path;
    tr.addEventListener("click", () => showRun(run.id));
  });
  $("#runs-note").textContent = (body.runs.length ? "" : t("no_runs") + " ")
    + (body.runs_dir ? t("runs_dir") + " " + body.runs_dir : "");
}

function stopPolling() {
  if (state.run && state.run.timer) clearTimeout(state.run.timer);
}

async function showRun(id, keepCurves) {
  const previous = state.run;
  stopPolling();
  const sameRun = keepCurves && previous && previous.id === id;
  const shown = sameRun ? previous : {id, offset: 0, rows: [], timer: null, stage: null};
  state.run = shown;
  document.querySelectorAll("#runs-table tr").forEach((tr) => tr.classList.toggle("selected", tr.dataset.id === id));
  const run = await getJson("/ui/api/runs/" + encodeURIComponent(id));
  $("#run-detail").hidden = false;
  $("#run-title").textContent = run.name;
  $("#run-path").textContent = run.path;
  const summary = $("#run-summary");
  summary.innerHTML = "";
  const m = run.manifest;
  const rows = [[t("state"), t("state_" + run.state)], [t("served_as"), run.served_as.join(", ") || t("none")]];
  if (m) {
    rows.push(["base model", m.base_model], ["model type", m.model_type],
      [t("method"), m.method + (Object.keys(m.method_settings || {}).length ? " " + JSON.stringify(m.method_settings) : "")],
      [t("template"), m.template], ["data fingerprint", m.data_fingerprint], ["max_seq_length", m.max_seq_length],
      ["global step", m.global_step], ["train loss", m.train_loss], ["eval loss", m.eval_loss],
      ["trainable parameters", m.trainable_parameters]);
    rows.push(...stageRows(m.stage));
  }
  shown.stage = runStage(m, run.audit);
  summary.appendChild(table(rows));
  if (!m) {
    const note = document.createElement("p");
    note.className = "dim";
    note.textContent = t("no_manifest");
    summary.appendChild(note);
  }
  renderEvals(run.evaluations);
  const audit = $("#run-audit");
  audit.innerHTML = "";
  if (run.audit) audit.appendChild(table(Object.entries(run.audit)));
  else audit.textContent = t("no_audit");
  if (sameRun) {
    drawCurves(run.state);
    pollMetrics();
  } else {
    await pollMetrics();
  }
}

// the stage of a run: its manifest's, or, while training before its first checkpoint, its data
// audit's (a preference run's audit names it); null for SFT
function runStage(manifest, audit) {
  if (manifest && manifest.stage) return manifest.stage.name;
  return audit && typeof audit.stage === "string" ? audit.stage : null;
}

// a preference run's stage (dpo, orpo, simpo, kto) with its settings, and its reference; none for SFT
function stageRows(stage) {
  if (!stage) return [];
  const settings = Object.fromEntries(Object.entries(stage).filter(([k]) => k !== "name" && k !== "reference"));
  return [[t("stage"), stage.name + (Object.keys(settings).length ? " " + JSON.stringify(settings) : "")],
    [t("reference"), stage.reference || t("none")]];
}

function renderEvals(evaluations) {
  const box = $("#run-evals");
  box.innerHTML = "";
  if (!evaluations.length) {
    box.textContent = t("no_evals");
    return;
  }
  evaluations.forEach((ev) => {
    const title = document.createElement("h4");
    title.textContent = ev.name;
    box.appendChild(title);
    if (ev.error) {
      box.appendChild(document.createTextNode(ev.error));
      return;
    }
    const metrics = ev.metrics || {};
    const el = document.createElement("table");
    el.className = "table eval";
    const head = el.createTHead().insertRow();
    const other = ev.compare;
    ["metric", other ? other.name : null, "value", other ? "better / worse / same" : null]
      .filter((x) => x !== null).forEach((x) => { head.appendChild(document.createElement("th")).textContent = x; });
    Object.entries(metrics).forEach(([name, value]) => {
      const tr = el.insertRow();
      tr.insertCell().textContent = name;
      if (other) tr.insertCell().textContent = cell((other.metrics || {})[name]);
      tr.insertCell().textContent = cell(value);
      if (other) {
        tr.insertCell().textContent = other.better && name in other.better
          ? other.better[name] + " / " + other.worse[name] + " / " + other.same[name] : "";
      }
    });
    box.appendChild(el);
  });
}

function series(rows, key) {
  const byStep = new Map();
  rows.forEach((row) => {
    if (typeof row.step === "number" && typeof row[key] === "number" && Number.isFinite(row[key])) byStep.set(row.step, row[key]);
  });
  return {name: key, points: [...byStep.entries()].sort((a, b) => a[0] - b[0])};
}

// the charts of a preference, reward-model or GRPO run, each with its train and eval series;
// `stages`: the stages that log it; `keys` may be a function of the logged rows (GRPO's rewards are
// named by their functions)
const PAIR_STAGES = ["dpo", "orpo", "simpo", "kto", "rm"];
const PREFERENCE_CHARTS = [
  {id: "#chart-rewards", title: "rewards", stages: PAIR_STAGES,
    keys: ["rewards/chosen", "rewards/rejected", "eval_rewards/chosen", "eval_rewards/rejected"]},
  {id: "#chart-accuracy", title: "reward_accuracy", keys: ["rewards/accuracies", "eval_rewards/accuracies"],
    stages: ["dpo", "orpo", "simpo", "rm"]},
  {id: "#chart-margin", title: "reward_margin", keys: ["rewards/margins", "eval_rewards/margins"],
    stages: PAIR_STAGES},
  {id: "#chart-grpo-reward", title: "grpo_reward", stages: ["grpo"], keys: grpoRewardKeys},
  {id: "#chart-length", title: "completion_length", stages: ["grpo"],
    keys: ["completion_length", "completion_length_min", "completion_length_max", "eval_completion_length"]},
  {id: "#chart-kl", title: "kl", keys: ["kl", "eval_kl"], stages: ["kto", "grpo"]},
];

// a GRPO run's reward series: the summed reward (train, eval), then each function's mean
function grpoRewardKeys(rows) {
  const names = new Set();
  rows.forEach((row) => Object.keys(row).forEach((key) => {
    if (/^rewards\/.+\/mean$/.test(key)) names.add(key);
  }));
  return ["reward", "eval_reward", ...[...names].sort()];
}

function chartKeys(chart, rows) {
  return typeof chart.keys === "function" ? chart.keys(rows) : chart.keys;
}

// a chart is shown when its series were logged, or when the run's stage logs them (before the
// first log); an SFT or pre-training run shows none
function chartShown(chart, stage, rows) {
  const keys = chartKeys(chart, rows);
  if (rows.some((row) => keys.some((key) => typeof row[key] === "number"))) return true;
  return Boolean(stage && chart.stages.includes(stage));
}

function drawPreferenceCharts(rows, stage, empty) {
  PREFERENCE_CHARTS.forEach((chart) => {
    const canvas = $(chart.id);
    canvas.hidden = !chartShown(chart, stage, rows);
    if (!canvas.hidden) {
      Charts.draw(canvas, t(chart.title), chartKeys(chart, rows).map((key) => series(rows, key)), empty);
    }
  });
}

function drawCurves(runState) {
  const rows = state.run.rows;
  const empty = t("no_data");
  Charts.draw($("#chart-loss"), t("loss"), [series(rows, "loss"), series(rows, "eval_loss")], empty);
  Charts.draw($("#chart-lr"), t("learning_rate"), [series(rows, "learning_rate")], empty);
  if (state.run.stage === "grpo") {  // its batches are prompts: the speed is the completions it samples
    Charts.draw($("#chart-tps"), t("completions_per_second"), [series(rows, "completions_per_second")], empty);
  } else {
    Charts.draw($("#chart-tps"), t("tokens_per_second"), [series(rows, "tokens_per_second")], empty);
  }
  drawPreferenceCharts(rows, state.run.stage, empty);
  const steps = rows.filter((r) => typeof r.step === "number").map((r) => r.step);
  $("#curve-status").textContent = rows.length + " " + t("rows_logged")
    + (steps.length ? ", " + t("last_step") + " " + Math.max(...steps) : "")
    + (runState === "training" ? " (" + t("updating") + ")" : "");
  $("#curve-status").dataset.rows = String(rows.length);
}

// whether the run's details are on the view shown (the runs view's, or the train view's job panel)
function runDetailShown() {
  const view = $("#run-detail").closest(".view");
  return Boolean(view && view.classList.contains("active"));
}

// read the shown run's new metrics rows; one read at a time (a call during a read is dropped:
// that read goes on polling)
async function pollMetrics() {
  const run = state.run;
  if (!run || run.busy) return;
  clearTimeout(run.timer);
  run.busy = true;
  let body;
  try {
    body = await getJson("/ui/api/runs/" + encodeURIComponent(run.id) + "/metrics?offset=" + run.offset);
  } catch (error) {
    $("#curve-status").textContent = t("error") + ": " + error.message;
    return;
  } finally {
    run.busy = false;
  }
  if (state.run !== run) return;
  if (body.reset) run.rows = [];
  run.rows.push(...body.rows);
  run.offset = body.offset;
  drawCurves(body.state);
  const more = body.offset < body.size;
  // while the details are shown, keep reading: a training may still be writing
  if (more || runDetailShown()) run.timer = setTimeout(pollMetrics, more ? 50 : 2000);
}

// ---------------------------------------------------------------- views and start

function showView(name) {
  document.querySelectorAll(".view").forEach((el) => {
    const active = el.id === "view-" + name;
    el.classList.toggle("active", active);
    el.hidden = !active;
  });
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.view === name));
  location.hash = name;
  hooks.view.forEach((hook) => hook(name));
  if (name === "runs") {
    loadRuns().catch((error) => { $("#runs-note").textContent = t("error") + ": " + error.message; });
    if (state.run) pollMetrics();
  } else if (!runDetailShown()) {
    stopPolling();
  }
}

function start() {
  restoreSettings();
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showView(b.dataset.view)));
  $("#lang-button").addEventListener("click", () => {
    state.lang = state.lang === "zh" ? "en" : "zh";
    localStorage.setItem(STORE.lang, state.lang);
    applyLanguage();
  });
  $("#key-form").addEventListener("submit", useKey);
  $("#key-button").addEventListener("click", () => askForKey(null));
  $("#key-button").hidden = !state.key;
  $("#chat-form").addEventListener("submit", send);
  $("#attach").addEventListener("click", () => $("#chat-image").click());
  $("#chat-image").addEventListener("change", (event) => {
    const input = event.target;
    attachFiles([...input.files]).finally(() => { input.value = ""; });
  });
  $("#chat-input").addEventListener("paste", (event) => {
    const files = [...((event.clipboardData && event.clipboardData.files) || [])]
      .filter((file) => file.type.startsWith("image/"));
    if (files.length && !$("#attach").disabled) {
      event.preventDefault();
      attachFiles(files);
    }
  });
  $("#chat-model").addEventListener("change", updateAttach);
  $("#chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
  });
  $("#stop-button").addEventListener("click", () => state.controller && state.controller.abort());
  $("#regenerate").addEventListener("click", regenerate);
  $("#clear").addEventListener("click", clearChat);
  $("#compare-form").addEventListener("submit", compare);
  $("#system-prompt").addEventListener("change", saveChat);
  ["#temperature", "#top-p", "#max-tokens", "#stop", "#chat-model", "#compare-left", "#compare-right"]
    .forEach((id) => $(id).addEventListener("change", saveSettings));
  applyLanguage();
  const view = (location.hash || "#chat").slice(1);
  showView(["chat", "compare", "runs", "train"].includes(view) ? view : "chat");  // train: workbench.js
  state.ready = loadModels().then(() => { document.body.dataset.ready = "1"; })
    .catch((error) => { $("#status").textContent = t("error") + ": " + error.message; });
}

document.addEventListener("DOMContentLoaded", start);
