// The playground page: plain JavaScript, no framework, no build step, no network beyond this server.
// One answer = one POST api/generate whose response is read as server-sent events (routes.py).
// Chat mode: the page keeps the public conversation (questions and the steered column's answers) and
// sends it with each new question; the server keeps nothing between answers.
"use strict";

const $ = (id) => document.getElementById(id);
const SLIDERS = {
  steering: [["T", "T: FTRL steps", 1], ["alpha", "α: LLM policy contrast", 0.1], ["beta", "β: weight of the SLM delta", 0.1],
             ["lam", "λ: KL anchor to the LLM", 0.1], ["eta", "η: FTRL step size", 0.5]],
  sampling: [["temperature", "temperature (0 = greedy)", 0.05], ["top_k", "top-k (0 = off; with temperature > 0)", 1],
             ["max_new_tokens", "max new tokens", 1]],
};
const state = { runId: null, controller: null, options: null, methods: [], columns: {}, tips: new WeakMap(),
                turns: [], turn: null };

// ---------------------------------------------------------------------------------------------
// Set-up: pickers, sliders, the example persona

async function init() {
  const [opts, table] = await Promise.all([getJSON("api/options"), getJSON("api/methods")]);
  state.options = opts;
  state.methods = table.methods;
  fillSelect($("llm"), opts.models.llm.map((m) => [m, m]));
  fillSelect($("slm"), opts.models.slm.map((m) => [m, m]));
  // the pickers come from the method table (api/methods): steered rows for the steered column, the
  // others beside the LLM alone; ◆ marks a method that reads the personal context
  const label = (m) => `${m.name}${m.needs_context ? " ◆" : ""}`;
  fillSelect($("method"), table.methods.filter((m) => m.steered).map((m) => [m.name, label(m), m.help]));
  $("method").value = table.default;
  for (const m of table.methods.filter((m) => m.name !== table.always)) {
    const box = document.createElement("label");
    box.title = m.help;
    box.dataset.method = m.name;
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = m.name;
    box.append(input, ` ${label(m)}`);
    $("extra").append(box);
  }
  showExtras();
  $("chat-note").textContent = `Chat mode keeps up to ${opts.chat.max_turns} turns.`;
  buildSliders($("steering-sliders"), SLIDERS.steering, opts.fields);
  buildSliders($("sampling-sliders"), SLIDERS.sampling, opts.fields);
  const where = $("where");
  where.textContent = opts.cloud ? `cloud LLM: ${opts.cloud}` : "LLM in this process (no cloud)";
  where.classList.toggle("remote", Boolean(opts.cloud));
  if (!$("query").value && !$("profile").value) loadExample();
  updateCoefficient();
}

async function getJSON(url) {
  const resp = await fetch(url);
  if (!resp.ok) throw new Error(`${url}: ${await errorText(resp)}`);
  return resp.json();
}

// The extra columns offered: every method but the one always shown (the LLM alone) and the steered one.
function showExtras() {
  for (const box of $("extra").children) {
    const steered = box.dataset.method === $("method").value;
    box.hidden = steered;
    if (steered) box.querySelector("input").checked = false;
  }
}

function fillSelect(select, items) {
  select.replaceChildren(...items.map(([value, text, title]) => {
    const o = new Option(text, value);
    if (title) o.title = title;
    return o;
  }));
}

function buildSliders(box, specs, fields) {
  for (const [name, label, step] of specs) {
    const f = fields[name];
    const min = f.ge ?? (f.gt !== undefined ? f.gt + step : 0);
    const row = document.createElement("div");
    row.className = "slider";
    row.innerHTML = `<label for="s-${name}">${label}</label>
      <input type="range" id="s-${name}" name="${name}" min="${min}" max="${f.le}" step="${step}" value="${f.default}">
      <output for="s-${name}">${f.default}</output>`;
    const input = row.querySelector("input");
    input.addEventListener("input", () => {
      row.querySelector("output").textContent = input.value;
      if (box.id === "steering-sliders") updateCoefficient();
    });
    box.append(row);
  }
}

function sliderValue(name) {
  return Number($(`s-${name}`).value);
}

function loadExample() {
  const ex = state.options.example;
  for (const key of ["query", "profile", "history", "preference", "reference"]) $(key).value = ex[key];
}

// The coefficient is the engine's own (SteeringConfig.coefficient), asked for as the sliders move.
let coefTimer = null;
function updateCoefficient() {
  clearTimeout(coefTimer);
  coefTimer = setTimeout(async () => {
    const q = new URLSearchParams({ method: $("method").value });
    for (const [name] of SLIDERS.steering) q.set(name, $(`s-${name}`).value);
    const resp = await fetch(`api/coefficient?${q}`);
    $("coefficient").textContent = resp.ok ? `b = ${(await resp.json()).coefficient.toFixed(3)}` : "—";
  }, 120);
}

// ---------------------------------------------------------------------------------------------
// One answer

function chatMode() {
  return $("chat").checked;
}

function request() {
  const body = {
    query: $("query").value, profile: $("profile").value, history: $("history").value,
    preference: $("preference").value, reference: $("reference").value, llm: $("llm").value, slm: $("slm").value, method: $("method").value,
    extra: [...$("extra").querySelectorAll("input:checked")].map((c) => c.value),
    turns: chatMode() ? state.turns : [],
  };
  for (const [name] of [...SLIDERS.steering, ...SLIDERS.sampling]) body[name] = sliderValue(name);
  return body;
}

async function generate(event) {
  event.preventDefault();
  if (state.controller) return;
  delete document.body.dataset.finished;
  $("errors").replaceChildren();
  if (chatMode() && state.turns.length / 2 >= state.options.chat.max_turns) {
    return showError(`the conversation holds ${state.options.chat.max_turns} turns, the most one question carries: ` +
                     "start a new conversation");
  }
  if (!chatMode()) newConversation();
  $("wire-body").replaceChildren();
  const body = request();
  state.turn = addTurn(body);
  state.columns = {};
  const controller = new AbortController();
  state.controller = controller;
  setRunning(true);
  try {
    const resp = await fetch("api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) showError(await errorText(resp));
    else await readEvents(resp.body, handle);
  } catch (e) {
    if (e.name !== "AbortError") showError(`lost the connection to the playground: ${e.message}`);
  } finally {
    if (chatMode()) keepTurn(body);
    state.controller = null;
    state.runId = null;
    setRunning(false);
    document.body.dataset.finished = "1";
  }
}

// ---------------------------------------------------------------------------------------------
// The conversation: one .turn per question (its question, then its columns)

function addTurn(body) {
  const turn = document.createElement("section");
  turn.className = "turn";
  turn.dataset.turn = body.turns.length / 2 + 1;
  turn.innerHTML = `<div class="question"><span class="who">you</span><span class="q"></span></div>
    <p class="carried note"></p><div class="columns"></div>`;
  turn.querySelector(".q").textContent = body.query;
  $("conversation").append(turn);
  return turn;
}

// A turn joins the conversation once its steered answer is complete: that answer is the one the
// next question carries (an error or a stop drops the turn, as `costeer chat` does).
function keepTurn(body) {
  const steered = state.columns[body.method];
  const ok = steered && steered.el.dataset.done === "1" && !$("errors").children.length;
  if (!ok) {
    state.turn.classList.add("dropped");
    state.turn.querySelector(".carried").textContent = "Not kept in the conversation: the steered answer did not finish.";
    return;
  }
  state.turns = [...body.turns, { role: "user", content: body.query },
                 { role: "assistant", content: steered.answer }];
  state.turn.dataset.kept = "1";
  $("query").value = "";
  showConversation();
}

function newConversation() {
  state.turns = [];
  $("conversation").replaceChildren();
  showConversation();
}

function showConversation() {
  const n = state.turns.length / 2;
  $("turns").textContent = chatMode() ? `${n} earlier turn${n === 1 ? "" : "s"} kept` : "";
  $("new-chat").hidden = !chatMode();
}

async function stop() {
  setStatus("stopping…");
  $("stop").disabled = true;
  if (!state.runId) return state.controller?.abort();  // not started yet: dropping the request stops it
  await fetch("api/stop", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ run_id: state.runId }),
  });
}

function setRunning(running) {
  $("go").disabled = running;
  $("stop").disabled = !running;
  document.body.classList.toggle("running", running);
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    const detail = body.detail ?? body.error ?? body;
    if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).slice(-1)[0] ?? ""}: ${d.msg}`).join("; ");
    return typeof detail === "string" ? detail : JSON.stringify(detail);
  } catch {
    return `HTTP ${resp.status}`;
  }
}

// Server-sent events over a fetch body: blocks separated by a blank line, `event:` and `data:` lines.
async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      let kind = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(kind, JSON.parse(data.join("\n")));
    }
  }
}

const HANDLERS = {
  run: (d) => { state.runId = d.run_id; },
  status: (d) => setStatus(d.message),
  start: (d) => {
    setStatus("generating…");
    const steered = d.streams.find((s) => s.steered)?.method;
    state.turn.querySelector(".carried").textContent = d.turn > 1
      ? `Turn ${d.turn}: every column read the ${d.turn - 1} earlier turn${d.turn > 2 ? "s" : ""} with the ${steered} ` +
        `answers (${d.llm_prompt_tokens} tokens of public conversation for the LLM).`
      : "";
    for (const s of d.streams) addColumn(s);
    $("wire-body").innerHTML = '<p class="note">Filled in when the answer ends.</p>';
  },
  token: (d) => addToken(state.columns[d.stream], d),
  done: (d) => {
    const col = state.columns[d.stream];
    col.el.classList.remove("running");
    col.foot.textContent = `${d.tokens} tokens · ${d.ms_per_token} ms/token · ${d.stop_reason === "stop" ? "finished" : "length limit"}`;
    col.el.dataset.done = "1";
    col.answer = d.text;  // the answer as the API cut it (stop strings): what chat mode carries
  },
  wire: (d) => showWire(d),
  error: (d) => {
    const col = d.stream && state.columns[d.stream];
    if (col) {
      col.el.classList.remove("running");
      col.foot.textContent = d.message;
      col.foot.classList.add("error");
    }
    showError(d.stream ? `${d.stream}: ${d.message}` : d.message);
  },
  end: (d) => {
    for (const col of Object.values(state.columns)) {
      if (col.el.classList.contains("running")) {
        col.el.classList.remove("running");
        col.foot.textContent = "stopped";
      }
    }
    setStatus(d.stopped ? "stopped: the device stopped and the cloud sessions ended" : "done");
  },
};

function handle(kind, data) {
  HANDLERS[kind]?.(data);
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(message) {
  const div = document.createElement("div");
  div.className = "error";
  div.textContent = message;
  $("errors").append(div);
}

// ---------------------------------------------------------------------------------------------
// Columns and the heat-map

function addColumn(stream) {
  const el = document.createElement("article");
  el.className = `column running${stream.steered ? " steered" : ""}`;
  el.dataset.method = stream.method;
  const coef = stream.coefficient == null ? "" : ` (b = ${stream.coefficient.toFixed(3)})`;
  el.innerHTML = `<h2></h2><div class="help"></div><div class="text"></div><div class="foot"></div>`;
  el.querySelector("h2").textContent = stream.method;
  el.querySelector(".help").textContent = stream.help + coef;
  state.turn.querySelector(".columns").append(el);
  state.columns[stream.method] = { el, text: el.querySelector(".text"), foot: el.querySelector(".foot") };
}

function addToken(col, d) {
  if (!col || !d.text) return;
  const span = document.createElement("span");
  span.textContent = d.text;
  if (d.shift !== undefined) {
    span.className = "tok";
    span.dataset.shift = d.shift;
    span.style.backgroundColor = heat(d.shift);
    state.tips.set(span, d);
  }
  col.text.append(span);
}

// Shift in nats -> a background: orange where steering raised the token, blue where it lowered it.
function heat(shift) {
  const a = Math.min(0.85, Math.abs(shift) / 4);
  if (a < 0.02) return "transparent";
  return shift > 0 ? `rgba(234, 88, 12, ${a.toFixed(3)})` : `rgba(37, 99, 235, ${a.toFixed(3)})`;
}

function visible(piece) {
  return piece.replace(/\n/g, "⏎").replace(/^ /, "␣").replace(/ $/, "␣");
}

function showTip(event) {
  const d = state.tips.get(event.target);
  const tip = $("tip");
  if (!d) return void (tip.hidden = true);
  const rows = [];
  for (let i = 0; i < Math.max(d.before.length, d.after.length); i++) {
    const cell = (pair) => pair
      ? `<td class="piece${pair[0] === d.text ? " chosen" : ""}"></td><td>${(100 * pair[1]).toFixed(1)}%</td>` : "<td></td><td></td>";
    rows.push(`<tr>${cell(d.before[i])}${cell(d.after[i])}</tr>`);
  }
  tip.innerHTML = `<div>shift ${d.shift >= 0 ? "+" : ""}${d.shift.toFixed(2)} nats${d.gated ? " (gated: not steered)" : ""}</div>
    <table><tr><th colspan="2">LLM alone</th><th colspan="2">steered</th></tr>${rows.join("")}</table>`;
  // token pieces are text, never markup
  const pieces = tip.querySelectorAll("td.piece");
  let k = 0;
  for (let i = 0; i < rows.length; i++) {
    for (const pair of [d.before[i], d.after[i]]) if (pair) pieces[k++].textContent = visible(pair[0]);
  }
  tip.hidden = false;
  tip.style.left = `${Math.min(event.clientX + 12, window.innerWidth - tip.offsetWidth - 8)}px`;
  tip.style.top = `${event.clientY + 16}px`;
}

// ---------------------------------------------------------------------------------------------
// The wire panel

function showWire(d) {
  const body = $("wire-body");
  body.querySelector(".note")?.remove();
  const card = document.createElement("div");
  card.className = "wire-card";
  card.dataset.stream = d.stream;
  const h = document.createElement("h3");
  h.textContent = d.stream;
  card.append(h);
  const para = (text, cls) => {
    const p = document.createElement("p");
    p.textContent = text;
    if (cls) p.className = cls;
    card.append(p);
  };
  const ids = (list) => {
    const div = document.createElement("div");
    div.className = "ids";
    div.textContent = list.length ? list.join(" ") : "(none)";
    card.append(div);
  };
  if (!d.remote) {
    para("In-process: the LLM runs in this process, so nothing crossed a network. Start the playground with " +
         "--cloud ws://HOST:PORT to see the bytes. What the LLM was given: the public conversation's prompt " +
         `(${d.llm_prompt_ids.length} token ids) and the ${d.token_ids.length} tokens chosen:`);
    ids(d.token_ids);
  } else if (!d.logged) {
    para("The LLM is remote, but this server keeps no wire log of its connection, so the bytes are not shown " +
         "(`costeer playground --cloud` keeps one). What it was sent: the public conversation's prompt " +
         `(${d.llm_prompt_ids.length} token ids) and the ${d.token_ids.length} tokens chosen:`);
    ids(d.token_ids);
  } else {
    para(`${fmt(d.bytes_up)} bytes up, ${fmt(d.bytes_down)} bytes down, ${d.messages} records ` +
         `(HTTP and WebSocket payloads, from the wire log).`);
    para(`Prompt sent (OPEN): ${d.prompt_ids.map((p) => p.length).join(" + ")} token ids, ` +
         (d.audit.prompt_is_public ? "exactly the public conversation's prompt." : "NOT the public conversation's prompt."),
         d.audit.prompt_is_public ? "ok" : "leak");
    para(`Token ids sent (${d.token_ids.length}):`);
    ids(d.token_ids);
    para(d.audit.clean ? "Audit: no 5-gram of your context crossed the wire."
                       : `Audit: context 5-grams on the wire: ${d.audit.leaks.join(" | ")}`, d.audit.clean ? "ok" : "leak");
    para(d.session_closed ? "Session: ended by the device." : "Session: still open on the cloud.");
  }
  body.append(card);
}

function fmt(n) {
  return n.toLocaleString("en");
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask").addEventListener("submit", generate);
  $("stop").addEventListener("click", stop);
  $("example").addEventListener("click", loadExample);
  $("method").addEventListener("change", () => { updateCoefficient(); showExtras(); });
  $("chat").addEventListener("change", () => { if (!chatMode()) newConversation(); showConversation(); });
  $("new-chat").addEventListener("click", newConversation);
  $("conversation").addEventListener("mouseover", showTip);
  $("conversation").addEventListener("mouseout", () => { $("tip").hidden = true; });
  init().catch((e) => showError(`cannot start the page: ${e.message}`));
});
