// rawwave page: mic -> WHIP (same endpoint as any WHIP client) -> events back over the data channel.
"use strict";

const $ = (id) => document.getElementById(id);
const RECONNECT_DELAY_MS = 1000;
const LINGER_AFTER_STOP_MS = 30000;

const state = {
  config: { ice_servers: [], auth: false },
  mic: null, pc: null, channel: null, location: null,
  session: null, lastSeq: 0, audioStart: 0, stopping: false, done: false,
};

function setStatus(name, text) {
  const el = document.querySelector('[data-testid="status"]');
  el.dataset.state = name;
  el.textContent = text || name;
}

function headers(extra) {
  const h = Object.assign({}, extra);
  const token = $("token").value.trim();
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

async function loadConfig() {
  try {
    const r = await fetch("/v1/config", { headers: headers() });
    if (r.ok) state.config = await r.json();
    else if (r.status === 401) state.config.auth = true;
  } catch (e) { /* the page still works with the defaults */ }
  $("token-label").hidden = !state.config.auth;
}

// -- events ---------------------------------------------------------------------------------------

function onEvent(event) {
  if (event.seq <= state.lastSeq) return; // a resumed stream never shows an event twice
  state.lastSeq = event.seq;
  const handler = HANDLERS[event.type];
  if (handler) handler(event);
}

const HANDLERS = {
  partial(e) {
    const p = $("partial");
    p.querySelector(".stable").textContent = e.stable;
    p.querySelector(".unstable").textContent = e.text.slice(e.stable.length);
    if (state.audioStart) {
      const ms = Math.max(0, Math.round(performance.now() - state.audioStart - e.t_ms));
      $("latency").textContent = "latency " + ms + " ms";
    }
  },
  final(e) {
    const line = document.createElement("p");
    line.className = "final";
    line.textContent = e.text;
    $("transcript").insertBefore(line, $("partial"));
    $("partial").querySelector(".stable").textContent = "";
    $("partial").querySelector(".unstable").textContent = "";
  },
  "response.delta"(e) { $("response").textContent += e.text; },
  "response.done"(e) { $("response").textContent = e.text; },
  error(e) { setStatus("error", "error: " + e.message); },
  done() { state.done = true; if (state.stopping) finish(); else setStatus("live", "done"); },
};

// -- the peer -------------------------------------------------------------------------------------

function gatheringComplete(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", check);
    setTimeout(resolve, 3000); // send what we have; WHIP here does not trickle
  });
}

async function connect() {
  const pc = new RTCPeerConnection({ iceServers: state.config.ice_servers });
  state.pc = pc;
  pc.addTransceiver(state.mic.getAudioTracks()[0], { direction: "sendonly" });
  const channel = pc.createDataChannel("events");
  state.channel = channel;
  channel.onmessage = (m) => onEvent(JSON.parse(m.data));
  pc.onconnectionstatechange = () => onConnectionState(pc);
  await pc.setLocalDescription(await pc.createOffer());
  await gatheringComplete(pc);
  const answer = await postOffer(pc.localDescription.sdp);
  await pc.setRemoteDescription({ type: "answer", sdp: answer });
}

async function postOffer(sdp) {
  const query = state.session
    ? "?session=" + encodeURIComponent(state.session) + "&last_seq=" + state.lastSeq
    : ($("respond").checked ? "?respond=1" : "");
  const r = await fetch("/whip" + query, {
    method: "POST", body: sdp, headers: headers({ "Content-Type": "application/sdp" }),
  });
  if (r.status !== 201) {
    const body = await r.json().catch(() => ({ error: r.statusText }));
    throw new Error(body.error || ("HTTP " + r.status));
  }
  state.location = r.headers.get("Location");
  state.session = r.headers.get("X-Rawwave-Session");
  $("session").textContent = "session " + state.session;
  return r.text();
}

function onConnectionState(pc) {
  if (pc !== state.pc) return;
  const s = pc.connectionState;
  if (s === "connected") {
    if (!state.audioStart) state.audioStart = performance.now();
    setStatus(state.stopping ? "finishing" : "live", state.stopping ? "finishing" : "live");
  } else if ((s === "failed" || s === "disconnected") && !state.stopping && !state.done) {
    reconnect();
  }
}

async function reconnect() {
  setStatus("reconnecting");
  const old = state.pc;
  state.pc = null;
  old.close();
  await new Promise((r) => setTimeout(r, RECONNECT_DELAY_MS));
  try { await connect(); } catch (e) { setStatus("error", "reconnect failed: " + e.message); }
}

// -- buttons --------------------------------------------------------------------------------------

async function start() {
  $("start").disabled = true;
  Object.assign(state, { session: null, lastSeq: 0, audioStart: 0, stopping: false, done: false });
  $("response").textContent = "";
  document.querySelectorAll("#transcript .final").forEach((n) => n.remove());
  setStatus("connecting");
  try {
    state.mic = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
    });
    await connect();
    $("stop").disabled = false;
  } catch (e) {
    setStatus("error", e.message);
    cleanup();
  }
}

function stop() {
  $("stop").disabled = true;
  state.stopping = true;
  setStatus("finishing");
  if (state.mic) state.mic.getTracks().forEach((t) => t.stop());
  if (state.channel && state.channel.readyState === "open") state.channel.send("stop");
  if (state.done) finish();
  else setTimeout(finish, LINGER_AFTER_STOP_MS); // the final events arrive over the still-open channel
}

function finish() {
  if (!state.pc) return;
  if (state.location) fetch(state.location, { method: "DELETE", headers: headers() }).catch(() => {});
  cleanup();
  setStatus("idle", "done");
}

function cleanup() {
  if (state.pc) state.pc.close();
  if (state.mic) state.mic.getTracks().forEach((t) => t.stop());
  Object.assign(state, { pc: null, channel: null, mic: null, location: null });
  $("start").disabled = false;
  $("stop").disabled = true;
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
loadConfig();
