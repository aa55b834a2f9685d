// The live sessions, keyed by id, as the API reports them, plus what the page derives:
// per-session throughput and the bytes moved by all sessions (for the throughput chart).

const SMOOTHING = 0.3; // weight of the newest second in the per-session rate (counters come ~1/s)

export class SessionStore {
  constructor() {
    this.byId = new Map(); // id -> {session, rateUp, rateDown, markUp, markDown}
    this.movedUp = 0; // bytes moved by every session seen since the page loaded
    this.movedDown = 0;
  }

  /** Replace everything with a fresh listing (on connect and reconnect). */
  reset(sessions) {
    const old = this.byId;
    this.byId = new Map();
    for (const session of sessions) {
      const known = old.get(session.id);
      this.byId.set(session.id, {
        ...(known ?? { rateUp: 0, rateDown: 0 }),
        session: known ? this.#merge(known.session, session) : session,
        markUp: known?.markUp ?? session.bytes_up,
        markDown: known?.markDown ?? session.bytes_down,
      });
    }
  }

  /** A start or update event: the session's latest record. */
  upsert(session) {
    const record = this.byId.get(session.id);
    if (record) {
      record.session = this.#merge(record.session, session);
    } else {
      this.byId.set(session.id, {
        session, rateUp: 0, rateDown: 0, markUp: session.bytes_up, markDown: session.bytes_down,
      });
      this.movedUp += session.bytes_up;
      this.movedDown += session.bytes_down;
    }
  }

  /** An end event (its data may carry the final counters) or a kill we made. */
  remove(session) {
    const record = this.byId.get(session.id);
    if (!record) return;
    this.#merge(record.session, session);
    this.byId.delete(session.id);
  }

  /** Once per sample period: each session's rate over the last `seconds`. */
  sampleRates(seconds) {
    for (const record of this.byId.values()) {
      const { bytes_up: up, bytes_down: down } = record.session;
      const rateUp = Math.max(0, up - record.markUp) / seconds;
      const rateDown = Math.max(0, down - record.markDown) / seconds;
      record.rateUp = SMOOTHING * rateUp + (1 - SMOOTHING) * record.rateUp;
      record.rateDown = SMOOTHING * rateDown + (1 - SMOOTHING) * record.rateDown;
      record.markUp = up;
      record.markDown = down;
    }
  }

  get size() {
    return this.byId.size;
  }

  records() {
    return this.byId.values();
  }

  // Counters only grow: an update that arrives late must neither lower them nor, when the
  // next one comes, count the same bytes twice. Events may carry only the changed fields.
  #merge(before, after) {
    const merged = { ...before, ...after };
    merged.bytes_up = Math.max(before.bytes_up, after.bytes_up ?? 0);
    merged.bytes_down = Math.max(before.bytes_down, after.bytes_down ?? 0);
    this.movedUp += merged.bytes_up - before.bytes_up;
    this.movedDown += merged.bytes_down - before.bytes_down;
    return merged;
  }
}
