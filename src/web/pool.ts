/**
 * Open file sessions of `bkfs web`: one `FilesSession` (one libguestfs appliance) per set of
 * checkpoints being browsed, kept open between requests and closed after `idleMs` without use, when
 * more than `max` would be open (the least recently used idle one), and on shutdown.
 *
 * A session serves one request at a time (its engine has one mounted tree); requests queue on it.
 * When `max` sessions are busy, a request for another one waits until one is released.
 *
 * Generic over what is pooled (`open`/`close`), so the policy is unit-tested without appliances.
 */

export interface PoolOptions<S> {
  max: number;
  idleMs: number;
  close: (s: S, key: string) => Promise<void>;
  onNotice?: (msg: string) => void;
}

interface Entry<S> {
  key: string;
  session: Promise<S>;
  /** Tail of the queue of users of this session. */
  tail: Promise<void>;
  users: number;
  lastUsed: number;
  timer: NodeJS.Timeout | undefined;
  failed: boolean;
}

export class SessionPool<S> {
  private readonly entries = new Map<string, Entry<S>>();
  private readonly waiters: (() => void)[] = [];
  private closing = false;

  constructor(private readonly o: PoolOptions<S>) {}

  get size(): number {
    return this.entries.size;
  }

  keys(): string[] {
    return [...this.entries.keys()];
  }

  /** Run `fn` with the session of `key` (opened by `open` if needed), alone on it. */
  async use<T>(key: string, open: () => Promise<S>, fn: (s: S) => Promise<T>): Promise<T> {
    if (this.closing) throw new Error('the server is stopping');
    const e = await this.entry(key, open);
    e.users++;
    if (e.timer) clearTimeout(e.timer);
    e.timer = undefined;
    const prev = e.tail;
    let release!: () => void;
    e.tail = new Promise<void>((r) => (release = r));
    try {
      await prev;
      const s = await e.session;
      return await fn(s);
    } catch (err) {
      if (e.failed) this.drop(e);
      throw err;
    } finally {
      release();
      e.users--;
      e.lastUsed = Date.now();
      if (e.users === 0 && this.entries.get(key) === e) {
        e.timer = setTimeout(() => void this.evict(e, 'idle'), this.o.idleMs);
        e.timer.unref();
        this.wake();
      }
    }
  }

  private async entry(key: string, open: () => Promise<S>): Promise<Entry<S>> {
    for (;;) {
      const have = this.entries.get(key);
      if (have) return have;
      if (this.entries.size < this.o.max) break;
      // Full: close the least recently used idle session, or wait for one to become idle.
      const idle = [...this.entries.values()]
        .filter((x) => x.users === 0)
        .sort((a, b) => a.lastUsed - b.lastUsed);
      const lru = idle[0];
      if (lru) {
        await this.evict(lru, 'too many open sessions');
        continue;
      }
      await new Promise<void>((r) => this.waiters.push(r));
    }
    const e: Entry<S> = {
      key,
      session: Promise.resolve() as unknown as Promise<S>,
      tail: Promise.resolve(),
      users: 0,
      lastUsed: Date.now(),
      timer: undefined,
      failed: false,
    };
    e.session = open();
    e.session.catch(() => {
      e.failed = true;
    });
    this.entries.set(key, e);
    return e;
  }

  private wake(): void {
    const w = this.waiters.splice(0);
    for (const r of w) r();
  }

  private drop(e: Entry<S>): void {
    if (this.entries.get(e.key) === e) this.entries.delete(e.key);
    if (e.timer) clearTimeout(e.timer);
    this.wake();
  }

  private async evict(e: Entry<S>, why: string): Promise<void> {
    if (this.entries.get(e.key) !== e || e.users > 0) return;
    this.drop(e);
    let s: S;
    try {
      s = await e.session;
    } catch {
      return; // never opened
    }
    this.o.onNotice?.(`closing file session ${e.key} (${why})`);
    await this.o
      .close(s, e.key)
      .catch((err: unknown) => this.o.onNotice?.(`closing ${e.key}: ${String(err)}`));
  }

  /** Close every session (waiting for running requests on them to finish). */
  async closeAll(): Promise<void> {
    this.closing = true;
    const all = [...this.entries.values()];
    await Promise.all(
      all.map(async (e) => {
        await e.tail.catch(() => undefined);
        e.users = 0;
        await this.evict(e, 'shutdown');
      }),
    );
    this.wake();
  }
}
