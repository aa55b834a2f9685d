// /api/events as a stream of {event, data} objects. EventSource cannot send an Authorization
// header, so this reads the server-sent-events text format from a streaming fetch instead.
// The server sends `event: start|update|end` with `data: {"sessions": [...]}`, and opens each
// stream with one `start` holding every live session.
// follow() keeps the stream open: on loss it reports, waits (exponential backoff with jitter)
// and reconnects, until stopped or the token is refused.

import { AuthError, authHeaders, checkStatus } from "./api.js";

const MIN_DELAY = 1000;
const MAX_DELAY = 30000;
// The server sends a keepalive comment every 15 s; a stream silent for longer than this is
// taken for dead (a connection that vanished without closing) and reopened.
const SILENCE_LIMIT = 45000;

async function openEvents(signal) {
  const headers = { ...authHeaders(), Accept: "text/event-stream" };
  const response = await checkStatus(await fetch("/api/events", { headers, signal }));
  return parse(response.body.pipeThrough(new TextDecoderStream()).getReader());
}

async function* parse(reader) {
  let buffer = "";
  let event = "message";
  let data = [];
  for (;;) {
    let timer;
    const silence = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error("the event stream went silent")), SILENCE_LIMIT);
    });
    let chunk;
    try {
      chunk = await Promise.race([reader.read(), silence]);
    } catch (err) {
      reader.cancel().catch(() => {});
      throw err;
    } finally {
      clearTimeout(timer);
    }
    const { value, done } = chunk;
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop(); // an incomplete last line waits for the next chunk
    for (const line of lines) {
      if (line === "") {
        // a blank line ends an event (a comment-only block has no data and is skipped)
        if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
        event = "message";
        data = [];
      } else if (line.startsWith("event:")) {
        event = line.slice(6).trim();
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
}

/**
 * handlers: onOpen(sessions) once per (re)connection with every live session,
 * onEvent({event, data}) per later event,
 * onLost(error, retryInMs) when the stream breaks, onAuthError(error) (then it stops).
 * Returns a function that stops following.
 */
export function follow(handlers) {
  const controller = new AbortController();
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  (async () => {
    let delay = MIN_DELAY;
    while (!controller.signal.aborted) {
      let error = new Error("the event stream ended");
      try {
        const events = await openEvents(controller.signal);
        const first = await events.next();
        if (first.done) throw error;
        handlers.onOpen(first.value.data.sessions);
        delay = MIN_DELAY;
        for await (const message of events) handlers.onEvent(message);
      } catch (err) {
        if (err instanceof AuthError) return handlers.onAuthError(err);
        error = err;
      }
      if (controller.signal.aborted) return;
      const wait = delay * (0.75 + Math.random() / 2);
      handlers.onLost(error, wait);
      await sleep(wait);
      delay = Math.min(delay * 2, MAX_DELAY);
    }
  })();
  return () => controller.abort();
}
