// The public HTTP API, as every client sees it. When the server answers 401 the page asks for an API key
// once, keeps it in sessionStorage (gone when the tab closes) and sends it as a Bearer token from then on.

const KEY = "deepserve.apiKey";
let asking = null; // one prompt for every request that got a 401 at the same time

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function withKey(headers) {
  const key = sessionStorage.getItem(KEY);
  const out = new Headers(headers || {});
  if (key) out.set("Authorization", `Bearer ${key}`);
  return out;
}

function askForKey() {
  if (!asking) {
    asking = new Promise((resolve) => {
      const dialog = document.getElementById("key-dialog");
      const input = document.getElementById("key-input");
      input.value = "";
      dialog.addEventListener("close", () => {
        const key = dialog.returnValue === "ok" ? input.value.trim() : "";
        if (key) sessionStorage.setItem(KEY, key);
        asking = null;
        resolve(Boolean(key));
      }, { once: true });
      dialog.showModal();
      input.focus();
    });
  }
  return asking;
}

/** fetch() with the API key; on 401 asks for a key and tries once more. */
export async function send(path, options = {}) {
  let response = await fetch(path, { ...options, headers: withKey(options.headers) });
  if (response.status === 401 && (await askForKey())) {
    response = await fetch(path, { ...options, headers: withKey(options.headers) });
  }
  return response;
}

/** The error text of a failed response: the server's {"error": ...} (OpenAI's {"error": {"message"}}). */
export async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error ?? body.detail;
    if (typeof error === "string") return error;
    if (error && typeof error.message === "string") return error.message;
  } catch (_) {
    // not JSON: show the text itself
  }
  return text || `HTTP ${response.status}`;
}

/** A JSON answer, or an ApiError carrying the server's message. */
export async function json(path, options = {}) {
  const response = await send(path, options);
  if (!response.ok) throw new ApiError(response.status, await errorText(response));
  return response.json();
}

/**
 * POST a JSON body and call onEvent(data) for each server-sent event. fetch() streaming, not EventSource,
 * because EventSource can neither POST nor send an Authorization header. Aborting `signal` closes the
 * connection, which the server takes as a cancel.
 */
export async function streamEvents(path, body, onEvent, signal) {
  const response = await send(path, { method: "POST", signal, body: JSON.stringify(body),
                                      headers: { "Content-Type": "application/json" } });
  if (!response.ok) throw new ApiError(response.status, await errorText(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data || data === "[DONE]") continue;
      const event = JSON.parse(data);
      if (event.error !== undefined) throw new ApiError(event.status ?? 500, event.error);
      onEvent(event);
    }
  }
}

/** Show `message` in the error element `el` (hidden when message is empty). */
export function showError(el, message) {
  if (!el) return;
  el.textContent = message || "";
  el.hidden = !message;
}
