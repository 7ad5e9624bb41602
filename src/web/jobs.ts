/**
 * Long jobs of `bkfs web` (restores): run in this process, reported through listeners (progress
 * throttled), cancelled through an AbortSignal. Jobs live as long as the server; the result of a
 * finished job is kept (the last `keep` jobs).
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { BkfsError, errorMessage, isBkfsError, type ErrorCode } from '../errors';
import { EXIT_CODES, EXIT_INTERNAL } from '../cli/exit-codes';

export type JobState = 'running' | 'done' | 'failed' | 'cancelled';

export interface JobError {
  code: ErrorCode | 'INTERNAL';
  exitCode: number;
  message: string;
}

export interface Job {
  id: string;
  kind: 'restore';
  state: JobState;
  vm: string;
  checkpoint: string;
  disk: string | null;
  to: string;
  user: string;
  started: number;
  finished: number | null;
  done: number;
  total: number;
  result: unknown;
  error: JobError | null;
}

export function jobError(e: unknown): JobError {
  if (isBkfsError(e)) return { code: e.code, exitCode: EXIT_CODES[e.code], message: e.message };
  return { code: 'INTERNAL', exitCode: EXIT_INTERNAL, message: errorMessage(e) };
}

export interface JobContext {
  signal: AbortSignal;
  onProgress: (p: { done: number; total: number }) => void;
}

export class JobManager {
  private readonly jobs = new Map<string, { job: Job; ac: AbortController; ended: Promise<void> }>();
  private readonly events = new EventEmitter();

  constructor(
    private readonly keep = 100,
    private readonly progressMs = 250,
  ) {
    this.events.setMaxListeners(0);
  }

  start(
    meta: Omit<Job, 'id' | 'state' | 'started' | 'finished' | 'done' | 'total' | 'result' | 'error'>,
    run: (ctx: JobContext) => Promise<unknown>,
    onEnd?: (job: Job) => void,
  ): Job {
    const job: Job = {
      ...meta,
      id: randomBytes(8).toString('hex'),
      state: 'running',
      started: Date.now(),
      finished: null,
      done: 0,
      total: 0,
      result: null,
      error: null,
    };
    const ac = new AbortController();
    let last = 0;
    const ctx: JobContext = {
      signal: ac.signal,
      onProgress: (p) => {
        job.done = p.done;
        job.total = p.total;
        const now = Date.now();
        if (now - last >= this.progressMs) {
          last = now;
          this.events.emit(job.id, 'progress', job);
        }
      },
    };
    const ended = (async () => {
      try {
        job.result = await run(ctx);
        job.state = 'done';
        job.done = job.total;
      } catch (e) {
        job.error = jobError(e);
        job.state = ac.signal.aborted ? 'cancelled' : 'failed';
      }
      job.finished = Date.now();
      onEnd?.(job);
      this.events.emit(job.id, 'end', job);
      this.prune();
    })();
    this.jobs.set(job.id, { job, ac, ended });
    return job;
  }

  get(id: string): Job {
    const j = this.jobs.get(id);
    if (!j) throw new BkfsError('NOT_FOUND', `no job '${id}'`);
    return j.job;
  }

  list(): Job[] {
    return [...this.jobs.values()].map((j) => j.job).sort((a, b) => b.started - a.started);
  }

  cancel(id: string): Job {
    const j = this.jobs.get(id);
    if (!j) throw new BkfsError('NOT_FOUND', `no job '${id}'`);
    if (j.job.state === 'running') j.ac.abort(new BkfsError('INTERRUPTED', 'restore cancelled'));
    return j.job;
  }

  /** Listen to a job's events until it ends; returns the unsubscribe function. */
  subscribe(id: string, fn: (event: 'progress' | 'end', job: Job) => void): () => void {
    const job = this.get(id);
    if (job.state !== 'running') {
      fn('end', job);
      return () => undefined;
    }
    const l = (event: 'progress' | 'end', j: Job) => fn(event, j);
    this.events.on(id, l);
    return () => this.events.off(id, l);
  }

  /** Cancel every running job and wait for all to end. */
  async stopAll(): Promise<void> {
    for (const j of this.jobs.values()) {
      if (j.job.state === 'running') j.ac.abort(new BkfsError('INTERRUPTED', 'the server is stopping'));
    }
    await Promise.all([...this.jobs.values()].map((j) => j.ended));
  }

  private prune(): void {
    const finished = this.list().filter((j) => j.state !== 'running');
    for (const j of finished.slice(this.keep)) this.jobs.delete(j.id);
  }
}
