// The Train view, shown when the server is `chattune workbench` (GET /ui/api/workbench answers;
// under a plain `chattune serve` it is a 404 and the tab stays hidden). Left: the training form,
// built from the server's schema, with Check (the server's validation, errors at their fields,
// the config as YAML and as commands), Preview data (the rendered rows, trained spans marked),
// Audit, Memory plan and Start. Right: the server's jobs (trainings, evaluations, exports) and the
// job shown: state, progress, Stop / Resume, its log, and for a finished training Evaluate, Chat
// and Export; the run's curves, evaluations and audit are the runs view's own details, moved into
// the job panel while the Train view is shown. Jobs live on the server: after a reload the page
// lists them again and shows the job it showed last.
// Loaded after app.js: it uses its globals ($, t, state, call, getJson, showView, showRun, ...).
// Text from files, models or logs is only ever put in the page as text, never as HTML.
"use strict";

Object.assign(TEXT.en, {
  wb_group_model: "Model", wb_group_data: "Data", wb_group_method: "Method", wb_group_train: "Training",
  wb_group_generate: "Generation", wb_group_preference: "Stage (pre-training, preference, reward model)",
  wb_group_rl: "Reinforcement learning (stage grpo)",
  wb_validate: "Check", wb_preview: "Preview data", wb_audit: "Audit", wb_plan: "Memory plan", wb_start: "Start",
  wb_upload: "Upload data", wb_upload_title: "Add a data file to the data folder (never over an existing one)",
  wb_uploaded: "uploaded", wb_reset: "Reset form", wb_reset_confirm: "Put every field back to its default?",
  wb_jobs: "Jobs", wb_no_jobs: "No jobs yet.", wb_stop: "Stop", wb_resume: "Resume", wb_log: "Log",
  wb_eval_data: "Evaluate on", wb_eval_limit: "Rows (empty: all)", wb_eval_compare: "compare with the base model",
  wb_eval: "Evaluate", wb_chat: "Chat", wb_chat_note: "Load this run as the chat view's model.",
  wb_export_out: "New model folder", wb_no_gguf: "no GGUF", wb_export: "Export",
  wb_state_queued: "queued", wb_state_running: "running", wb_state_stopping: "stopping",
  wb_state_stopped: "stopped", wb_state_finished: "finished", wb_state_failed: "failed",
  wb_kind_train: "training", wb_kind_eval: "evaluation", wb_kind_export: "export",
  wb_position: "in line", wb_step: "step", wb_eta: "ETA", wb_elapsed: "elapsed", wb_epoch: "epoch",
  wb_choose: "— choose —", wb_none_files: "(the data folder has no files)",
  wb_run_name: "name of the new run", wb_multi_note: "Ctrl/⌘-click picks several",
  wb_ok: "The form is valid.", wb_config: "config.yaml", wb_command: "Command",
  wb_overrides: "Or with no file, every setting on the command line:", wb_output_dir: "The run will be written to",
  wb_download: "Download", wb_preview_title: "Data preview", wb_marked: "Marked spans are what the model is trained on.",
  wb_read: "read", wb_kept: "kept", wb_skipped: "skipped", wb_row: "Row", wb_messages: "Messages",
  wb_audit_title: "Data audit", wb_plan_title: "Memory plan", wb_loading_model: "loading the model…",
  wb_folders: "Folders", wb_no_model: "no model loaded: Chat on a trained run loads one",
});
Object.assign(TEXT.zh, {
  wb_group_model: "模型", wb_group_data: "数据", wb_group_method: "微调方法", wb_group_train: "训练",
  wb_group_generate: "生成", wb_group_preference: "训练阶段（预训练、偏好、奖励模型）",
  wb_group_rl: "强化学习（stage grpo）",
  wb_validate: "检查", wb_preview: "预览数据", wb_audit: "数据审计", wb_plan: "显存估算", wb_start: "开始训练",
  wb_upload: "上传数据", wb_upload_title: "把数据文件加入数据目录（不会覆盖已有文件）",
  wb_uploaded: "已上传", wb_reset: "重置表单", wb_reset_confirm: "把所有字段恢复为默认值？",
  wb_jobs: "任务", wb_no_jobs: "还没有任务。", wb_stop: "停止", wb_resume: "继续训练", wb_log: "日志",
  wb_eval_data: "评测数据", wb_eval_limit: "行数（留空：全部）", wb_eval_compare: "与基座模型对比",
  wb_eval: "评测", wb_chat: "对话", wb_chat_note: "把这个运行加载为对话页的模型。",
  wb_export_out: "新模型目录名", wb_no_gguf: "不导出 GGUF", wb_export: "导出",
  wb_state_queued: "排队中", wb_state_running: "运行中", wb_state_stopping: "正在停止",
  wb_state_stopped: "已停止", wb_state_finished: "已完成", wb_state_failed: "失败",
  wb_kind_train: "训练", wb_kind_eval: "评测", wb_kind_export: "导出",
  wb_position: "排队位置", wb_step: "步数", wb_eta: "预计剩余", wb_elapsed: "已用时", wb_epoch: "轮次",
  wb_choose: "— 请选择 —", wb_none_files: "（数据目录中没有文件）",
  wb_run_name: "新运行的名称", wb_multi_note: "按住 Ctrl/⌘ 点击可多选",
  wb_ok: "表单有效。", wb_config: "config.yaml", wb_command: "命令",
  wb_overrides: "或者不用配置文件，全部写在命令行：", wb_output_dir: "运行将写入",
  wb_download: "下载", wb_preview_title: "数据预览", wb_marked: "高亮部分是模型要学习的内容。",
  wb_read: "读取", wb_kept: "保留", wb_skipped: "跳过", wb_row: "行", wb_messages: "消息",
  wb_audit_title: "数据审计", wb_plan_title: "显存估算", wb_loading_model: "正在加载模型…",
  wb_folders: "目录", wb_no_model: "尚未加载模型：在训练好的运行上点“对话”即可加载",
});

const WB_API = "/ui/api/workbench";
const WB_STORE = {job: "chattune.workbench.job", form: "chattune.workbench.form"};
const WB_OPEN_GROUPS = ["model", "data", "method", "train"];
const WB_ACTIVE = ["queued", "running", "stopping"];
const WB_JOB_POLL_MS = 1500;
const WB_LIST_POLL_MS = 3000;

const wb = {
  info: null,         // GET /ui/api/workbench: the server is a workbench
  groups: [],         // the form's schema
  fields: {},         // key -> {spec, input, wrap, error}
  models: [],         // [{name, kind}] of the models folder
  files: [],          // [{name, size}] of the data folder
  jobs: [],           // the server's jobs, newest first
  selected: localStorage.getItem(WB_STORE.job),  // the id of the job shown
  job: null,          // its last GET
  jobTimer: null,
  listTimer: null,
  jobReads: 0,        // reads of the job shown so far: only the newest read goes on polling
  listReads: 0,       // the same for the jobs list
  pollFailed: false,  // the last read of the job shown failed (its error is shown)
  restored: false,    // the first jobs list re-selected the job shown before a reload
  runShown: null,     // the run whose details are in the job panel
  runsHome: null,     // where #run-detail lives on the runs view
  firstView: location.hash.slice(1),
};

function wbShown() {
  return $("#view-train").classList.contains("active");
}

function wbEl(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

// an element whose text is the i18n string `key` (and follows the language)
function wbLabel(tag, key, className) {
  const node = wbEl(tag, className, t(key));
  node.dataset.i18n = key;
  return node;
}

// POST JSON; {ok, status, body}; a failure to reach the server is an Error
async function wbPost(path, body) {
  const response = await call(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                     body: JSON.stringify(body === undefined ? {} : body)});
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  return {ok: response.ok, status: response.status, body: data};
}

// {key, message} of an error answer ({"error": {"message", "param", "code"}})
function wbFailure(result) {
  const error = result.body && result.body.error;
  if (error) return {key: error.param || null, message: error.message || String(result.status)};
  return {key: null, message: result.status + " " + JSON.stringify(result.body)};
}

// every problem of an error answer: an invalid form's 400 lists them all ("errors")
function wbFailures(result) {
  const errors = result.body && result.body.errors;
  return Array.isArray(errors) && errors.length ? errors : [wbFailure(result)];
}

// run `work` with `button` disabled; an error reaching the server goes to `onError`
async function wbBusy(button, work, onError) {
  if (button.disabled) return;
  button.disabled = true;
  button.classList.add("working");
  try {
    await work();
  } catch (error) {
    (onError || wbGeneralError)(t("error") + ": " + error.message);
  } finally {
    button.disabled = false;
    button.classList.remove("working");
  }
}

function wbDuration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), rest = String(s % 60).padStart(2, "0");
  return h ? h + ":" + String(m).padStart(2, "0") + ":" + rest : m + ":" + rest;
}

function wbTime(value) {
  if (value === null || value === undefined || value === "") return "";
  const date = typeof value === "number" ? new Date(value < 1e12 ? value * 1000 : value) : new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  return date.toLocaleString(state.lang === "zh" ? "zh-CN" : "en", {month: "short", day: "numeric",
    hour: "2-digit", minute: "2-digit", second: "2-digit"});
}

function wbDownload(name, text) {
  const url = URL.createObjectURL(new Blob([text], {type: "text/plain;charset=utf-8"}));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 2000);
}

// ---------------------------------------------------------------- the form

function wbIsMulti(spec) {
  return spec.folder === "data" && (spec.type === "list" || spec.type === "data" || /_files$/.test(spec.key));
}

function wbOption(value, text) {
  const option = document.createElement("option");
  option.value = value;
  option.textContent = text === undefined ? value : text;
  return option;
}

function wbInput(spec) {
  const fallback = spec.default_text === null || spec.default_text === undefined ? "" : String(spec.default_text);
  let input;
  if (spec.folder === "models" || spec.folder === "data") {
    input = document.createElement("select");
    input.multiple = wbIsMulti(spec);
  } else if (spec.type === "choice" || spec.type === "bool") {
    input = document.createElement("select");
    const choices = spec.type === "bool" ? ["true", "false"] : (spec.choices || []).map(String);
    if (!choices.includes(fallback)) input.appendChild(wbOption(fallback, fallback || "—"));
    choices.forEach((choice) => input.appendChild(wbOption(choice)));
    input.value = fallback;
  } else {
    input = document.createElement("input");
    input.type = "text";
    input.spellcheck = false;
    input.value = spec.folder === "runs" ? "" : fallback;
    if (spec.folder === "runs") {
      input.placeholder = t("wb_run_name");
      input.dataset.i18nPlaceholder = "wb_run_name";
    }
  }
  input.id = "wb-field-" + spec.key;
  input.name = spec.key;
  input.dataset.key = spec.key;
  if (spec.help) input.title = spec.help;
  return input;
}

function wbField(spec) {
  const wrap = wbEl("div", "wb-field");
  wrap.dataset.key = spec.key;
  if (wbIsMulti(spec) || spec.type === "dict") wrap.classList.add("wide");
  const name = wbEl("label", "wb-key", spec.key);
  name.htmlFor = "wb-field-" + spec.key;
  if (spec.required) name.appendChild(wbEl("span", "wb-required", " *"));
  const input = wbInput(spec);
  const error = wbEl("div", "wb-error");
  error.id = "wb-error-" + spec.key;
  error.hidden = true;
  wrap.append(name, input);
  if (spec.help) {
    const help = wbEl("div", "wb-help", spec.help);
    help.title = spec.help;
    wrap.appendChild(help);
  }
  if (wbIsMulti(spec)) wrap.appendChild(wbLabel("div", "wb_multi_note", "wb-help"));
  wrap.appendChild(error);
  input.addEventListener("change", () => {
    wbFieldError(spec.key, null);
    if (spec.key === "method") wbShowMethodFields();
    wbSaveForm();
  });
  return {spec, input, wrap, error};
}

function wbBuildForm() {
  const box = $("#wb-groups");
  box.innerHTML = "";
  wb.fields = {};
  wb.groups.forEach((group) => {
    const details = wbEl("details", "wb-group");
    details.dataset.group = group.name;
    details.id = "wb-group-" + group.name;
    details.open = WB_OPEN_GROUPS.includes(group.name);
    const key = "wb_group_" + group.name;
    details.appendChild(TEXT.en[key] ? wbLabel("summary", key) : wbEl("summary", "", group.name));
    const grid = wbEl("div", "wb-fields");
    group.keys.forEach((spec) => {
      const field = wbField(spec);
      wb.fields[spec.key] = field;
      grid.appendChild(field.wrap);
    });
    details.appendChild(grid);
    box.appendChild(details);
  });
  wbFillFolders();
  const saved = readJson(WB_STORE.form, {});
  Object.entries(saved).forEach(([key, text]) => { if (wb.fields[key]) wbSetText(key, String(text)); });
  wbShowMethodFields();
}

// the text of a field as the server reads it (key=value); several files are comma-joined
function wbText(key) {
  const input = wb.fields[key].input;
  if (input.multiple) return [...input.selectedOptions].map((o) => o.value).join(",");
  return input.value.trim();
}

function wbSetText(key, text) {
  const input = wb.fields[key].input;
  if (input.tagName !== "SELECT") {
    input.value = text;
    return;
  }
  const wanted = input.multiple ? text.split(",").map((x) => x.trim()).filter(Boolean) : [text];
  wanted.forEach((value) => {
    if (value && ![...input.options].some((o) => o.value === value)) input.appendChild(wbOption(value));
  });
  [...input.options].forEach((o) => { o.selected = wanted.includes(o.value); });
  if (!input.multiple) input.value = text;
}

function wbDefault(spec) {
  if (spec.folder === "runs") return "";
  return spec.default_text === null || spec.default_text === undefined ? "" : String(spec.default_text);
}

// fill the selects of the models and data folders, keeping what is chosen
function wbFillFolders() {
  Object.values(wb.fields).forEach(({spec, input}) => {
    if (spec.folder !== "models" && spec.folder !== "data") return;
    const chosen = input.multiple ? [...input.selectedOptions].map((o) => o.value) : [input.value || wbDefault(spec)];
    input.innerHTML = "";
    if (!input.multiple) input.appendChild(wbOption("", spec.required ? t("wb_choose") : "—"));
    const names = spec.folder === "models"
      ? wb.models.map((m) => [m.name, m.kind === "gguf" ? m.name + " (GGUF)" : m.name])
      : wb.files.map((f) => [f.name, f.name]);
    names.forEach(([value, text]) => input.appendChild(wbOption(value, text)));
    if (input.multiple) input.size = Math.min(5, Math.max(2, names.length));
    chosen.filter(Boolean).forEach((value) => {
      if (!names.some(([name]) => name === value)) input.appendChild(wbOption(value));
    });
    [...input.options].forEach((o) => { o.selected = chosen.includes(o.value) && (o.value !== "" || !input.multiple); });
  });
  const evalData = $("#wb-eval-data");
  const current = evalData.value;
  evalData.innerHTML = "";
  wb.files.forEach((f) => evalData.appendChild(wbOption(f.name)));
  if (!wb.files.length) evalData.appendChild(wbOption("", t("wb_none_files")));
  const preferred = [current, ...wbFormFiles("eval_files"), ...wbFormFiles("train_files")]
    .find((name) => name && wb.files.some((f) => f.name === name));
  if (preferred) evalData.value = preferred;
}

function wbFormFiles(key) {
  return wb.fields[key] ? wbText(key).split(",").filter(Boolean) : [];
}

// a key that belongs to some methods only is shown while the method field names one of them
function wbShowMethodFields() {
  const method = wb.fields.method ? wbText("method") : null;
  Object.values(wb.fields).forEach(({spec, wrap}) => {
    wrap.hidden = Boolean(spec.methods && method !== null && !spec.methods.includes(method));
  });
}

function wbSaveForm() {
  const changed = {};
  Object.values(wb.fields).forEach(({spec}) => {
    const text = wbText(spec.key);
    if (text !== wbDefault(spec)) changed[spec.key] = text;
  });
  localStorage.setItem(WB_STORE.form, JSON.stringify(changed));
}

// what the server gets: the fields that differ from their default, and the path fields
function wbValues() {
  const values = {};
  Object.values(wb.fields).forEach(({spec, wrap}) => {
    if (wrap.hidden) return;
    const text = wbText(spec.key);
    const path = spec.folder !== null && spec.folder !== undefined;
    if (text !== wbDefault(spec) || (path && (spec.required || text))) values[spec.key] = text;
  });
  return values;
}

function wbFieldError(key, message) {
  const field = wb.fields[key];
  if (!field) return;
  field.error.textContent = message || "";
  field.error.hidden = !message;
  field.wrap.classList.toggle("invalid", Boolean(message));
  if (message) field.input.setAttribute("aria-invalid", "true");
  else field.input.removeAttribute("aria-invalid");
}

function wbGeneralError(message) {
  const box = $("#wb-form-error");
  box.textContent = message || "";
  box.hidden = !message;
}

function wbClearErrors() {
  Object.keys(wb.fields).forEach((key) => wbFieldError(key, null));
  wbGeneralError("");
}

// each error at its field (its group opened), or in the box under the buttons
function wbShowErrors(errors) {
  wbClearErrors();
  const general = [];
  let first = null;
  errors.forEach(({key, message}) => {
    const field = key && wb.fields[key];
    if (!field || field.wrap.hidden) {
      general.push(message);
      return;
    }
    const shown = field.error.hidden ? message : field.error.textContent + "\n" + message;
    wbFieldError(key, shown);
    field.wrap.closest("details").open = true;
    first = first || field;
  });
  wbGeneralError(general.join("\n"));
  if (first) first.wrap.scrollIntoView({block: "center"});
  else if (general.length) $("#wb-form-error").scrollIntoView({block: "nearest"});
}

// ---------------------------------------------------------------- the output area

function wbOutput(kind, titleKey, nodes) {
  const out = $("#wb-output");
  out.innerHTML = "";
  out.dataset.kind = kind;
  out.appendChild(wbLabel("h3", titleKey));
  nodes.forEach((node) => out.appendChild(node));
  out.scrollIntoView({block: "start"});
}

function wbPre(text, id) {
  const pre = wbEl("pre", "wb-text", text);
  if (id) pre.id = id;
  return pre;
}

function wbHeading(key, buttonId, onClick) {
  const head = wbEl("div", "wb-out-head");
  head.appendChild(wbLabel("h4", key));
  if (buttonId) {
    const button = wbLabel("button", "wb_download", "small");
    button.type = "button";
    button.id = buttonId;
    button.addEventListener("click", onClick);
    head.appendChild(button);
  }
  return head;
}

// a rendering with its trained spans (between ⟪ and ⟫) as <mark>, built as text nodes
function wbMarked(rendering) {
  const pre = wbEl("pre", "wb-rendering");
  let inside = false;
  String(rendering).split(/([⟪⟫])/).forEach((part) => {
    if (part === "⟪") inside = true;
    else if (part === "⟫") inside = false;
    else if (part) pre.appendChild(inside ? wbEl("mark", "", part) : document.createTextNode(part));
  });
  return pre;
}

function wbShowConfig(body) {
  const nodes = [wbLabel("p", "wb_ok", "wb-ok")];
  if (body.output_dir) {
    const where = wbEl("p", "dim small-text");
    where.append(wbLabel("span", "wb_output_dir"), document.createTextNode(" "), wbEl("span", "mono", body.output_dir));
    nodes.push(where);
  }
  nodes.push(wbHeading("wb_config", "wb-download-yaml", () => wbDownload("config.yaml", body.yaml)),
    wbPre(body.yaml, "wb-yaml"),
    wbHeading("wb_command", "wb-download-command", () => wbDownload("train.sh",
      "#!/bin/sh\n# " + body.command + "  (with config.yaml next to it)\n" + body.command + "\n")),
    wbPre(body.command, "wb-command"));
  if (body.overrides_command) {
    nodes.push(wbLabel("p", "wb_overrides", "dim small-text"), wbPre(body.overrides_command, "wb-overrides-command"));
  }
  wbOutput("config", "wb_validate", nodes);
}

function wbShowPreview(body) {
  const read = body.read || {};
  const reasons = Object.assign({}, read.skipped || {});
  (read.files || []).forEach((file) => Object.entries(file.skipped_reasons || {}).forEach(([reason, n]) => {
    reasons[reason] = (reasons[reason] || 0) + n;
  }));
  const skipped = Object.entries(reasons).map(([reason, n]) => reason + ": " + n).join(", ");
  const summary = wbEl("p", "dim");
  summary.id = "wb-preview-read";
  summary.textContent = [body.template ? t("template") + " " + body.template : null,
    t("wb_read") + " " + cell(read.rows), t("wb_kept") + " " + cell(read.kept),
    t("wb_skipped") + " " + (skipped || "0")].filter(Boolean).join(" · ");
  const nodes = [summary, wbLabel("p", "wb_marked", "dim small-text")];
  (body.rows || []).forEach((row) => {
    const box = wbEl("div", "wb-row");
    box.dataset.index = String(row.index);
    box.appendChild(wbEl("h4", "", t("wb_row") + " " + row.index));
    box.appendChild(wbMarked(row.rendering || ""));
    if (row.messages && row.messages.length) {
      const details = wbEl("details", "wb-messages");
      details.appendChild(wbLabel("summary", "wb_messages"));
      row.messages.forEach((m) => {
        const line = wbEl("div", "wb-message");
        line.append(wbEl("span", "wb-role", m.role), wbEl("span", "", typeof m.content === "string"
          ? m.content : JSON.stringify(m.content)));
        details.appendChild(line);
      });
      box.appendChild(details);
    }
    nodes.push(box);
  });
  wbOutput("preview", "wb_preview_title", nodes);
}

// Check, Preview data, Audit, Memory plan: each posts the form and shows what comes back
async function wbFormAction(button, route) {
  await wbBusy(button, async () => {
    const result = await wbPost(WB_API + "/" + route, {values: wbValues()});
    if (!result.ok) {
      wbShowErrors(wbFailures(result));
      return;
    }
    const body = result.body;
    if (route === "validate") {
      if (!body.ok) {
        wbShowErrors(body.errors || []);
        return;
      }
      wbClearErrors();
      wbShowConfig(body);
      return;
    }
    wbClearErrors();
    if (route === "preview") wbShowPreview(body);
    else if (route === "audit") wbOutput("audit", "wb_audit_title", [wbPre(body.text, "wb-audit-text")]);
    else wbOutput("plan", "wb_plan_title", [wbPre(body.text, "wb-plan-text")]);
  });
}

async function wbStart(button) {
  await wbBusy(button, async () => {
    const result = await wbPost(WB_API + "/jobs", {kind: "train", values: wbValues()});
    if (!result.ok) {
      wbShowErrors(wbFailures(result));
      return;
    }
    wbClearErrors();
    wbAdopt(result.body);
  });
}

async function wbUpload(input) {
  const files = [...input.files];
  input.value = "";
  const added = [];
  for (const file of files) {
    const response = await call(WB_API + "/data?name=" + encodeURIComponent(file.name), {
      method: "POST", body: file, headers: {"Content-Type": "application/octet-stream"}});
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      wbGeneralError(file.name + ": " + wbFailure({status: response.status, body}).message);
      return;
    }
    added.push(body.name);
  }
  await wbLoadFolders();
  const train = wb.fields.train_files;
  if (train && added.length) {
    wbSetText("train_files", [...wbFormFiles("train_files"), ...added].join(","));
    wbFieldError("train_files", null);
    wbSaveForm();
  }
  wbGeneralError("");
  $("#status").textContent = added.join(", ") + " " + t("wb_uploaded");
}

// ---------------------------------------------------------------- jobs

async function wbLoadJobs() {
  const body = await getJson(WB_API + "/jobs");
  wb.jobs = body.jobs || [];
  wbRenderJobs();
  if (!wb.restored) {
    wb.restored = true;
    const known = wb.jobs.some((j) => j.id === wb.selected);
    const active = wb.jobs.find((j) => WB_ACTIVE.includes(j.state));
    const id = known ? wb.selected : active ? active.id : null;
    if (id) wbSelect(id);
    return;
  }
  // a job shown that is no longer polled (it ended) but the list says changed: show it again
  const shown = wb.job && wb.jobs.find((j) => j.id === wb.job.id);
  if (shown && shown.state !== wb.job.state && !wb.jobTimer) wbPollJob();
}

function wbStateText(job) {
  let text = t("wb_state_" + job.state);
  if (job.state === "queued" && job.position !== null && job.position !== undefined) {
    text += " (" + t("wb_position") + " " + job.position + ")";
  }
  return text;
}

function wbBadge(job) {
  const badge = wbEl("span", "badge state-" + job.state, wbStateText(job));
  badge.dataset.state = job.state;
  return badge;
}

function wbRenderJobs() {
  const box = $("#wb-jobs");
  box.innerHTML = "";
  if (!wb.jobs.length) {
    box.appendChild(wbLabel("p", "wb_no_jobs", "dim"));
    return;
  }
  wb.jobs.forEach((job) => {
    const row = wbEl("div", "wb-job-row" + (job.id === wb.selected ? " selected" : ""));
    row.dataset.id = job.id;
    row.dataset.state = job.state;
    row.dataset.kind = job.kind;
    row.tabIndex = 0;
    row.setAttribute("role", "button");
    const title = wbEl("span", "wb-job-name", job.title || job.run_name || job.id);
    const kind = wbEl("span", "dim small-text", t("wb_kind_" + job.kind) + " · " + wbTime(job.created));
    row.append(wbBadge(job), title, kind);
    row.title = job.command || "";
    row.addEventListener("click", () => wbSelect(job.id));
    row.addEventListener("keydown", (event) => { if (event.key === "Enter") wbSelect(job.id); });
    box.appendChild(row);
  });
}

function wbListPolling() {
  clearTimeout(wb.listTimer);
  wb.listTimer = null;
  if (!wbShown()) return;
  const read = ++wb.listReads;
  wbLoadJobs().catch(() => {}).finally(() => {
    if (read === wb.listReads && wbShown()) wb.listTimer = setTimeout(wbListPolling, WB_LIST_POLL_MS);
  });
}

// a job the server has just made (Start, Resume, Evaluate, Export): list it and show it
function wbAdopt(job) {
  wb.jobs = [job, ...wb.jobs.filter((j) => j.id !== job.id)];
  wbRenderJobs();
  wbSelect(job.id);
}

function wbSelect(id) {
  if (wb.selected !== id) {
    wb.job = null;
    $("#wb-log").textContent = "";
    $("#wb-export-out").value = "";
  }
  wb.selected = id;
  localStorage.setItem(WB_STORE.job, id);
  document.querySelectorAll(".wb-job-row").forEach((row) => row.classList.toggle("selected", row.dataset.id === id));
  $("#wb-job-error").hidden = true;
  return wbPollJob();
}

async function wbPollJob() {
  clearTimeout(wb.jobTimer);
  wb.jobTimer = null;
  const id = wb.selected;
  if (!id) return;
  const read = ++wb.jobReads;
  const current = () => read === wb.jobReads && wb.selected === id;
  let response;
  try {
    response = await call(WB_API + "/jobs/" + encodeURIComponent(id));
  } catch (error) {
    if (!current()) return;
    wbPollError(t("error") + ": " + error.message);
    if (wbShown()) wb.jobTimer = setTimeout(wbPollJob, WB_JOB_POLL_MS * 2);
    return;
  }
  if (!current()) return;
  if (response.status === 404) {  // a job of an earlier server
    wb.selected = null;
    wb.job = null;
    localStorage.removeItem(WB_STORE.job);
    $("#wb-job").hidden = true;
    return;
  }
  if (!response.ok) {
    wbPollError(t("error") + ": " + await errorText(response));
    if (wbShown()) wb.jobTimer = setTimeout(wbPollJob, WB_JOB_POLL_MS * 2);
    return;
  }
  const job = await response.json();
  if (!current()) return;
  if (wb.pollFailed) wbPollError("");
  const before = wb.job;
  wb.job = job;
  wbRenderJob(job, before);
  if (WB_ACTIVE.includes(job.state) && wbShown()) wb.jobTimer = setTimeout(wbPollJob, WB_JOB_POLL_MS);
}

// an error reading the job shown (cleared by the next read that works)
function wbPollError(message) {
  wb.pollFailed = Boolean(message);
  wbJobError(message);
}

function wbJobError(message) {
  const box = $("#wb-job-error");
  box.textContent = message || "";
  box.hidden = !message;
}

function wbProgress(job) {
  const box = $("#wb-progress");
  const p = job.progress;
  box.hidden = !p;
  if (!p) return;
  const fraction = typeof p.fraction === "number" ? p.fraction
    : (p.max_steps ? (p.step || 0) / p.max_steps : 0);
  box.querySelector(".fill").style.width = Math.max(0, Math.min(100, fraction * 100)).toFixed(1) + "%";
  box.dataset.step = String(p.step === null || p.step === undefined ? "" : p.step);
  box.dataset.maxSteps = String(p.max_steps === null || p.max_steps === undefined ? "" : p.max_steps);
  const parts = [t("wb_step") + " " + cell(p.step) + " / " + cell(p.max_steps), Math.round(fraction * 100) + "%"];
  if (typeof p.epoch === "number") parts.push(t("wb_epoch") + " " + p.epoch.toFixed(2));
  if (typeof p.elapsed === "number") parts.push(t("wb_elapsed") + " " + wbDuration(p.elapsed));
  if (typeof p.eta_seconds === "number" && WB_ACTIVE.includes(job.state)) {
    parts.push(t("wb_eta") + " " + wbDuration(p.eta_seconds));
  }
  box.querySelector(".text").textContent = parts.join(" · ");
}

function wbRenderJob(job, before) {
  $("#wb-job").hidden = false;
  $("#wb-job").dataset.id = job.id;
  $("#wb-job").dataset.state = job.state;
  $("#wb-job-title").textContent = job.title || job.run_name || job.id;
  const badge = $("#wb-job-state");
  badge.className = "badge state-" + job.state;
  badge.dataset.state = job.state;
  badge.textContent = wbStateText(job);
  const message = $("#wb-job-message");
  message.textContent = job.message || "";
  message.hidden = !job.message;
  message.classList.toggle("error", job.state === "failed");
  const outcome = $("#wb-outcome");  // the log's lines that say what the job came to
  outcome.innerHTML = "";
  (job.outcome || []).forEach((line) => outcome.appendChild(wbEl("li", /error/i.test(line) ? "error" : "", line)));
  outcome.hidden = !outcome.children.length;
  $("#wb-job-command").textContent = job.command || "";
  wbProgress(job);
  const stop = $("#wb-stop");
  stop.hidden = !WB_ACTIVE.includes(job.state);
  stop.disabled = job.state === "stopping";
  $("#wb-resume").hidden = !job.resumable || WB_ACTIVE.includes(job.state);
  const actions = job.kind === "train" && ["finished", "stopped"].includes(job.state) && Boolean(job.run);
  $("#wb-run-actions").hidden = !actions;
  if (actions && !$("#wb-export-out").value) $("#wb-export-out").value = (job.run_name || "run") + "-merged";
  const log = $("#wb-log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8 || !before || before.id !== job.id;
  if (log.textContent !== (job.log || "")) {
    log.textContent = job.log || "";
    if (atEnd) log.scrollTop = log.scrollHeight;
  }
  const row = document.querySelector(`.wb-job-row[data-id="${CSS.escape(job.id)}"]`);
  if (row && row.dataset.state !== job.state) {
    row.dataset.state = job.state;
    row.querySelector(".badge").replaceWith(wbBadge(job));
  }
  const ended = before && before.id === job.id && before.state !== job.state && !WB_ACTIVE.includes(job.state);
  // a new training's run folder is there once it has begun (its progress is written then)
  const begun = job.kind !== "train" || Boolean(job.progress) || !WB_ACTIVE.includes(job.state);
  wbPlaceRun(begun ? job.run : null, ended);
  if (ended) {
    wbLoadJobs().catch(() => {});
    wbLoadFolders().catch(() => {});  // an export adds a model folder
  }
}

// the job's run: the runs view's details (curves, evaluations, audit), in the job panel
function wbPlaceRun(runId, refresh) {
  const detail = $("#run-detail");
  const slot = $("#wb-run-slot");
  if (!runId || !wbShown()) {
    if (detail.parentNode === slot) wb.runsHome.appendChild(detail);
    wb.runShown = null;
    return;
  }
  if (detail.parentNode !== slot) slot.appendChild(detail);
  if (wb.runShown !== runId || !state.run || state.run.id !== runId) {
    wb.runShown = runId;
    showRun(runId).catch(() => { wb.runShown = null; });
  } else if (refresh) {
    showRun(runId, true).catch(() => {});
  } else {
    pollMetrics();  // a no-op while a read is under way
  }
}

async function wbJobAction(button, work) {
  wbJobError("");
  await wbBusy(button, async () => {
    const result = await work();
    if (!result.ok) {
      wbJobError(wbFailure(result).message);
      return;
    }
    if (result.status === 201) wbAdopt(result.body);
    else wbPollJob();
  }, wbJobError);
}

function wbJobPath(suffix) {
  return WB_API + "/jobs/" + encodeURIComponent(wb.job.id) + suffix;
}

async function wbChat(button) {
  wbJobError("");
  const run = wb.job && wb.job.run;
  if (!run) return;
  const before = button.textContent;
  button.textContent = t("wb_loading_model");
  try {
    await wbBusy(button, async () => {
      const result = await wbPost(WB_API + "/chat", {run});
      if (!result.ok) {
        wbJobError(wbFailure(result).message);
        return;
      }
      const model = result.body.model;
      state.settings.model = model;
      showView("chat");
      await loadModels();
      if (state.models.includes(model)) {
        $("#chat-model").value = model;
        saveSettings();
        updateAttach();
      }
    }, wbJobError);
  } finally {
    button.textContent = before;
  }
}

// ---------------------------------------------------------------- start

async function wbLoadFolders() {
  const [models, data] = await Promise.all([getJson(WB_API + "/models"), getJson(WB_API + "/data")]);
  wb.models = models.models || [];
  wb.files = data.files || [];
  wbFillFolders();
}

function wbOnView(name) {
  if (name === "runs" && wb.runsHome && $("#run-detail").parentNode !== wb.runsHome) {
    wb.runsHome.appendChild($("#run-detail"));
    wb.runShown = null;
  }
  if (!wb.info) return;
  if (name === "train") {
    wbListPolling();
    wbLoadFolders().catch(() => {});
    if (wb.job) wbPollJob();
  } else {
    clearTimeout(wb.listTimer);
    clearTimeout(wb.jobTimer);
    wb.listTimer = wb.jobTimer = null;
  }
}

async function wbProbe() {
  const response = await call(WB_API);
  if (!response.ok) {  // a plain `chattune serve`: no Train view
    document.body.dataset.workbench = "0";
    if (wbShown()) showView("chat");
    return;
  }
  wb.info = await response.json();
  const schema = await getJson(WB_API + "/schema");
  wb.groups = schema.groups || [];
  try {
    const [models, data] = await Promise.all([getJson(WB_API + "/models"), getJson(WB_API + "/data")]);
    wb.models = models.models || [];
    wb.files = data.files || [];
  } catch (error) {
    wbGeneralError(t("error") + ": " + error.message);
  }
  wbBuildForm();
  $("#wb-folders").textContent = t("wb_folders") + ": models " + wb.info.models_dir + " · data "
    + wb.info.data_dir + " · runs " + wb.info.runs_dir;
  $("#tabs button[data-view=train]").hidden = false;
  // no model loaded yet (the chat's models are a 503): say how to load one
  state.ready.then(() => { if (!wb.info.model && !state.models.length) $("#status").textContent = t("wb_no_model"); });
  document.body.dataset.workbench = "1";
  // the Train view is the workbench's first view (or the view shown before a reload)
  if (wbShown() || (!wb.firstView && location.hash === "#chat")) showView("train");
}

function wbStartPage() {
  wb.runsHome = $("#run-detail").parentNode;
  $("#wb-form").addEventListener("submit", (event) => event.preventDefault());
  [["#wb-validate", "validate"], ["#wb-preview", "preview"], ["#wb-audit", "audit"], ["#wb-plan", "plan"]]
    .forEach(([id, route]) => $(id).addEventListener("click", () => wbFormAction($(id), route)));
  $("#wb-start").addEventListener("click", () => wbStart($("#wb-start")));
  $("#wb-upload").addEventListener("change", (event) => {
    wbUpload(event.target).catch((error) => wbGeneralError(t("error") + ": " + error.message));
  });
  $("#wb-reset").addEventListener("click", () => {
    if (!window.confirm(t("wb_reset_confirm"))) return;
    localStorage.removeItem(WB_STORE.form);
    wbBuildForm();
    wbClearErrors();
  });
  $("#wb-stop").addEventListener("click", () => wbJobAction($("#wb-stop"), () => wbPost(wbJobPath("/stop"))));
  $("#wb-resume").addEventListener("click", () => wbJobAction($("#wb-resume"), () => wbPost(wbJobPath("/resume"))));
  $("#wb-eval").addEventListener("click", () => wbJobAction($("#wb-eval"), () => {
    const limit = parseInt($("#wb-eval-limit").value, 10);
    return wbPost(WB_API + "/jobs", {kind: "eval", run: wb.job.run, data: $("#wb-eval-data").value,
                                     compare: $("#wb-eval-compare").checked ? "base" : null,
                                     limit: Number.isFinite(limit) && limit > 0 ? limit : null});
  }));
  $("#wb-export").addEventListener("click", () => wbJobAction($("#wb-export"), () => wbPost(WB_API + "/jobs", {
    kind: "export", run: wb.job.run, out: $("#wb-export-out").value.trim(), gguf: $("#wb-export-gguf").value || null})));
  $("#wb-chat").addEventListener("click", () => wbChat($("#wb-chat")));
  hooks.view.push(wbOnView);
  hooks.language.push(() => {
    if (!wb.info) return;
    wbRenderJobs();
    if (wb.job) wbRenderJob(wb.job, wb.job);
    wbFillFolders();
  });
  wbProbe().catch((error) => {
    document.body.dataset.workbench = "0";
    if (wbShown()) showView("chat");
    $("#status").textContent = t("error") + ": " + error.message;
  });
}

document.addEventListener("DOMContentLoaded", wbStartPage);
