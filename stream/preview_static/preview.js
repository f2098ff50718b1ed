// lineinspect preview page: lists the lines, opens one as a receive-only WebRTC video.
// The token comes from the page URL (?token=...) and is sent as a header to the API.
"use strict";
(() => {
  const params = new URLSearchParams(window.location.search);
  const token = params.get("token") || "";
  const camera = params.get("camera") || "";
  const video = document.getElementById("video");
  const statusEl = document.getElementById("status");
  const linesEl = document.getElementById("lines");
  const currentEl = document.getElementById("current");
  const state = { line: null, connection: "new", error: null };
  window.previewState = state; // read by tests and for troubleshooting
  let pc = null;

  function setStatus(text) { statusEl.textContent = text; }

  // receive-side figures of the open line (troubleshooting, tests)
  window.previewStats = async () => {
    const out = {};
    if (!pc) return out;
    (await pc.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") {
        Object.assign(out, { framesReceived: r.framesReceived, framesDecoded: r.framesDecoded,
          framesDropped: r.framesDropped, bytesReceived: r.bytesReceived, frameWidth: r.frameWidth,
          frameHeight: r.frameHeight, keyFramesDecoded: r.keyFramesDecoded });
      }
    });
    return out;
  };

  async function api(path, options) {
    const headers = Object.assign({ "X-Preview-Token": token }, (options && options.headers) || {});
    const resp = await fetch(path, Object.assign({}, options, { headers, credentials: "same-origin" }));
    if (!resp.ok) {
      let message = resp.status + " " + resp.statusText;
      try { message += ": " + (await resp.json()).error; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    return resp.json();
  }

  function waitForIce(conn) {
    if (conn.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        if (conn.iceGatheringState === "complete") {
          conn.removeEventListener("icegatheringstatechange", done);
          resolve();
        }
      };
      conn.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, 3000); // whatever was gathered by then is enough on a local network
    });
  }

  function closePeer() {
    if (pc) { pc.close(); pc = null; }
    video.srcObject = null;
  }

  async function watch(line) {
    closePeer();
    state.line = line; state.error = null; state.connection = "connecting";
    window.dispatchEvent(new CustomEvent("previewline", { detail: line })); // the review panel follows the line
    currentEl.textContent = camera ? line + " / " + camera : line;
    for (const b of linesEl.querySelectorAll("button")) b.classList.toggle("active", b.dataset.line === line);
    setStatus("connecting to " + line + "\u2026");
    const conn = new RTCPeerConnection({ iceServers: [] });
    pc = conn;
    conn.addTransceiver("video", { direction: "recvonly" });
    conn.addEventListener("track", (ev) => {
      video.srcObject = ev.streams && ev.streams[0] ? ev.streams[0] : new MediaStream([ev.track]);
    });
    conn.addEventListener("connectionstatechange", () => {
      state.connection = conn.connectionState;
      setStatus(line + ": " + conn.connectionState);
    });
    try {
      await conn.setLocalDescription(await conn.createOffer());
      await waitForIce(conn);
      const answer = await api("/api/offer", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ line, camera, sdp: conn.localDescription.sdp, type: conn.localDescription.type }),
      });
      if (pc !== conn) return; // another line was opened meanwhile
      await conn.setRemoteDescription(answer);
    } catch (err) {
      state.error = String(err); state.connection = "failed";
      setStatus("cannot open " + line + ": " + err.message);
      if (pc === conn) closePeer();
    }
  }

  async function loadLines() {
    try {
      const data = await api("/api/lines");
      linesEl.replaceChildren();
      for (const line of data.lines) {
        const li = document.createElement("li");
        const b = document.createElement("button");
        b.type = "button"; b.textContent = line; b.dataset.line = line;
        b.classList.toggle("active", line === state.line);
        b.addEventListener("click", () => watch(line));
        li.appendChild(b); linesEl.appendChild(li);
      }
      if (!data.lines.length) setStatus("no lines yet: start an ingest process");
      else if (!state.line) setStatus(data.lines.length + " line(s)");
      return data.lines;
    } catch (err) {
      state.error = String(err);
      setStatus("cannot list lines: " + err.message);
      return [];
    }
  }

  document.getElementById("refresh").addEventListener("click", loadLines);
  window.addEventListener("pagehide", closePeer);
  loadLines().then((lines) => {
    const wanted = params.get("line");
    if (wanted && lines.includes(wanted)) watch(wanted);
    else if (wanted) setStatus("unknown line " + wanted);
  });
})();
