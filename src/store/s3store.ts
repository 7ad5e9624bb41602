/**
 * `ObjectStore` on an S3-compatible bucket (AWS S3, Ceph RADOS Gateway, MinIO, ...), through the
 * maintained AWS SDK for JavaScript v3. Location syntax: `s3://BUCKET[/PREFIX]`.
 *
 * Endpoint, region and credentials come from the usual places (the SDK's default chain:
 * AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, AWS_ENDPOINT_URL, AWS_REGION),
 * or explicitly from `S3StoreOptions`. Path-style addressing (what RGW and MinIO need) is used
 * whenever an endpoint is given.
 *
 * What this adds over the SDK:
 *  - errors as BkfsErrors with one-line messages: bad credentials / access denied -> STORE_ACCESS,
 *    no such bucket -> REPO_NOT_FOUND, unreachable endpoint or 5xx after the retries ->
 *    STORE_UNAVAILABLE, missing object -> NOT_FOUND, short object -> DATA_DAMAGED;
 *  - retries with exponential backoff (the SDK's standard strategy, `maxAttempts`) and timeouts
 *    for connecting and for each request, so a dead endpoint fails in bounded time;
 *  - Content-MD5 on every single PUT (the server rejects a body that changed on the way) and the
 *    multipart upload of large files through @aws-sdk/lib-storage;
 *  - `ifAbsent` through `If-None-Match: *` (RGW 16 and AWS honour it: 412 when the key exists).
 *
 * Checksum mode is WHEN_REQUIRED: the SDK's default (WHEN_SUPPORTED) sends streamed bodies with
 * aws-chunked trailing checksums, which RGW 16 refuses (411 MissingContentLength).
 */
import * as fs from 'node:fs';
import { createHash } from 'node:crypto';
import { Agent as HttpAgent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import {
  DeleteObjectsCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
} from '@aws-sdk/client-s3';
import { Upload } from '@aws-sdk/lib-storage';
import { NodeHttpHandler } from '@smithy/node-http-handler';
import { BkfsError, isBkfsError } from '../errors';
import { checkKey, type ObjectInfo, type ObjectStore, type PutOptions } from './objstore';

export interface S3Location {
  bucket: string;
  /** '' or a prefix ending in '/'. */
  prefix: string;
}

/** Parse `s3://BUCKET[/PREFIX]`. */
export function parseS3Location(url: string): S3Location {
  const m = /^s3:\/\/([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:\/(.*))?$/.exec(url);
  if (!m) {
    throw new BkfsError('USAGE', `'${url}' is not s3://BUCKET[/PREFIX] (bucket: 3-63 of a-z 0-9 . -)`);
  }
  const rest = (m[2] ?? '').replace(/\/+$/, '');
  if (rest !== '') checkKey(rest);
  return { bucket: m[1] as string, prefix: rest === '' ? '' : `${rest}/` };
}

export interface S3StoreOptions {
  endpoint?: string;
  region?: string;
  accessKeyId?: string;
  secretAccessKey?: string;
  /** Attempts per request including the first (default 5). */
  maxAttempts?: number;
  /** ms to connect (default 5000) and to wait for a response (default 60000). */
  connectTimeoutMs?: number;
  requestTimeoutMs?: number;
  /** Parallel connections (default 16). */
  maxSockets?: number;
  /** Files larger than this are uploaded in parts of this size (default 16 MiB). */
  partSize?: number;
}

const DELETE_BATCH = 1000;

export class S3Store implements ObjectStore {
  readonly kind = 's3' as const;
  readonly location: string;
  private readonly client: S3Client;
  private readonly bucket: string;
  private readonly prefix: string;
  private readonly partSize: number;
  private readonly endpoint: string;

  constructor(url: string, opts: S3StoreOptions = {}) {
    const loc = parseS3Location(url);
    this.bucket = loc.bucket;
    this.prefix = loc.prefix;
    this.location = `s3://${loc.bucket}${loc.prefix ? `/${loc.prefix.slice(0, -1)}` : ''}`;
    this.partSize = opts.partSize ?? 16 << 20;
    const endpoint = opts.endpoint ?? process.env.AWS_ENDPOINT_URL_S3 ?? process.env.AWS_ENDPOINT_URL;
    this.endpoint = endpoint ?? 'AWS S3';
    const maxSockets = opts.maxSockets ?? 16;
    this.client = new S3Client({
      endpoint,
      forcePathStyle: endpoint !== undefined,
      region: opts.region ?? process.env.AWS_REGION ?? process.env.AWS_DEFAULT_REGION ?? 'us-east-1',
      credentials:
        opts.accessKeyId && opts.secretAccessKey
          ? { accessKeyId: opts.accessKeyId, secretAccessKey: opts.secretAccessKey }
          : undefined,
      maxAttempts: opts.maxAttempts ?? 5,
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: new NodeHttpHandler({
        connectionTimeout: opts.connectTimeoutMs ?? 5000,
        requestTimeout: opts.requestTimeoutMs ?? 60000,
        httpAgent: new HttpAgent({ keepAlive: true, maxSockets }),
        httpsAgent: new HttpsAgent({ keepAlive: true, maxSockets }),
      }),
    });
    if (process.env.BKFS_S3_STATS) this.countRequests(process.env.BKFS_S3_STATS);
  }

  /**
   * `BKFS_S3_STATS=FILE` (benchmarks): count the HTTP requests this process sends, by S3
   * operation, each retry included (an SDK middleware inside the retry loop), and append them to
   * FILE as one JSON line `{pid, requests: {GetObject: n, ...}, bytesOut, bytesIn}` at exit.
   */
  private countRequests(file: string): void {
    const counts: Record<string, number> = {};
    let bytesOut = 0;
    let bytesIn = 0;
    const len = (m: unknown): number => {
      const h = (m as { headers?: Record<string, string> } | undefined)?.headers ?? {};
      const n = Number(h['content-length'] ?? h['Content-Length'] ?? 0);
      return Number.isFinite(n) ? n : 0;
    };
    this.client.middlewareStack.add(
      (next, context) => async (args) => {
        const op = String((context as { commandName?: string }).commandName ?? 'unknown').replace(
          /Command$/,
          '',
        );
        counts[op] = (counts[op] ?? 0) + 1;
        bytesOut += len(args.request);
        const r = await next(args);
        // A HEAD's content-length is the object's size, not bytes received.
        if (!op.startsWith('Head')) bytesIn += len(r.response);
        return r;
      },
      { step: 'deserialize', name: 'bkfsRequestCounter' },
    );
    process.once('exit', () => {
      if (Object.keys(counts).length > 0)
        fs.appendFileSync(
          file,
          JSON.stringify({ pid: process.pid, requests: counts, bytesOut, bytesIn }) + '\n',
        );
    });
  }

  private key(key: string): string {
    checkKey(key);
    return this.prefix + key;
  }

  /** Fails with a coded one-line error unless the bucket exists and the credentials may use it. */
  async check(): Promise<void> {
    await this.call('open', async () => {
      await this.client.send(new HeadBucketCommand({ Bucket: this.bucket }));
    });
  }

  async put(key: string, data: Buffer, opts: PutOptions = {}): Promise<void> {
    const k = this.key(key);
    await this.call(`write ${key}`, async () => {
      await this.client.send(
        new PutObjectCommand({
          Bucket: this.bucket,
          Key: k,
          Body: data,
          ContentLength: data.length,
          ContentMD5: createHash('md5').update(data).digest('base64'),
          IfNoneMatch: opts.ifAbsent ? '*' : undefined,
        }),
      );
    });
  }

  async putFile(key: string, file: string, opts: PutOptions = {}): Promise<void> {
    const size = fs.statSync(file).size;
    if (size <= this.partSize) {
      await this.put(key, fs.readFileSync(file), opts);
      return;
    }
    if (opts.ifAbsent && (await this.head(key))) {
      throw new BkfsError('TARGET_EXISTS', `object ${key} exists already in ${this.location}`);
    }
    const k = this.key(key);
    await this.call(`write ${key}`, async () => {
      const up = new Upload({
        client: this.client,
        params: { Bucket: this.bucket, Key: k, Body: fs.createReadStream(file) },
        partSize: this.partSize,
        queueSize: 4,
        leavePartsOnError: false,
      });
      await up.done();
    });
  }

  async get(key: string): Promise<Buffer> {
    const k = this.key(key);
    return this.call(`read ${key}`, async () => {
      const r = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: k }));
      return Buffer.from(
        await (r.Body as { transformToByteArray(): Promise<Uint8Array> }).transformToByteArray(),
      );
    });
  }

  async getRange(key: string, offset: number, length: number): Promise<Buffer> {
    if (length === 0) return Buffer.alloc(0);
    const k = this.key(key);
    const buf = await this.call(`read ${key}`, async () => {
      const r = await this.client.send(
        new GetObjectCommand({
          Bucket: this.bucket,
          Key: k,
          Range: `bytes=${offset}-${offset + length - 1}`,
        }),
      );
      return Buffer.from(
        await (r.Body as { transformToByteArray(): Promise<Uint8Array> }).transformToByteArray(),
      );
    });
    if (buf.length !== length) {
      throw new BkfsError(
        'DATA_DAMAGED',
        `object ${key} ends before byte ${offset + length} (got ${buf.length} of ${length} bytes)`,
      );
    }
    return buf;
  }

  async head(key: string): Promise<ObjectInfo | null> {
    const k = this.key(key);
    try {
      return await this.call(`stat ${key}`, async () => {
        const r = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: k }));
        return { key, size: r.ContentLength ?? 0 };
      });
    } catch (e) {
      if (isBkfsError(e) && e.code === 'NOT_FOUND') return null;
      throw e;
    }
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    if (prefix !== '') checkKey(prefix.endsWith('/') ? prefix.slice(0, -1) : prefix);
    let token: string | undefined;
    do {
      const page = await this.call('list', () =>
        this.client.send(
          new ListObjectsV2Command({
            Bucket: this.bucket,
            Prefix: this.prefix + prefix,
            ContinuationToken: token,
          }),
        ),
      );
      for (const o of page.Contents ?? []) {
        if (!o.Key) continue;
        yield { key: o.Key.slice(this.prefix.length), size: o.Size ?? 0 };
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
  }

  async delete(keys: string[]): Promise<void> {
    for (let i = 0; i < keys.length; i += DELETE_BATCH) {
      const batch = keys.slice(i, i + DELETE_BATCH).map((k) => ({ Key: this.key(k) }));
      const r = await this.call('delete', () =>
        this.client.send(
          new DeleteObjectsCommand({ Bucket: this.bucket, Delete: { Objects: batch, Quiet: true } }),
        ),
      );
      const failed = (r.Errors ?? []).filter((e) => e.Code !== 'NoSuchKey');
      if (failed.length > 0) {
        const f = failed[0] as { Key?: string; Code?: string; Message?: string };
        throw new BkfsError(
          'STORE_UNAVAILABLE',
          `${this.location}: could not delete ${failed.length} object(s), first ${f.Key}: ${f.Code} ${f.Message ?? ''}`.trim(),
        );
      }
    }
  }

  async close(): Promise<void> {
    this.client.destroy();
  }

  /** Run one SDK call, turning its failures into coded one-line errors. */
  private async call<T>(what: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      throw this.translate(e, what);
    }
  }

  private translate(e: unknown, what: string): unknown {
    if (isBkfsError(e)) return e;
    const err = e as {
      name?: string;
      code?: string;
      message?: string;
      $metadata?: { httpStatusCode?: number };
    };
    const status = err.$metadata?.httpStatusCode;
    const name = err.name ?? '';
    const where = `${this.location} (${this.endpoint})`;
    if (
      ['InvalidAccessKeyId', 'SignatureDoesNotMatch', 'AccessDenied', 'CredentialsProviderError'].includes(
        name,
      ) ||
      status === 403
    ) {
      return new BkfsError(
        'STORE_ACCESS',
        `${where}: access denied to ${what}: ${name || status} (check the access key and secret)`,
      );
    }
    if (name === 'NoSuchBucket' || (status === 404 && what === 'open')) {
      return new BkfsError('REPO_NOT_FOUND', `${where}: bucket ${this.bucket} does not exist`);
    }
    if (name === 'NoSuchKey' || name === 'NotFound' || status === 404) {
      return new BkfsError('NOT_FOUND', `${where}: cannot ${what}: no such object`);
    }
    if (name === 'PreconditionFailed' || status === 412) {
      return new BkfsError('TARGET_EXISTS', `${where}: cannot ${what}: the object exists already`);
    }
    const netCodes = [
      'ECONNREFUSED',
      'ECONNRESET',
      'ETIMEDOUT',
      'ENOTFOUND',
      'EHOSTUNREACH',
      'ENETUNREACH',
      'EPIPE',
    ];
    if (
      (status !== undefined && status >= 500) ||
      netCodes.includes(err.code ?? '') ||
      netCodes.includes(name) ||
      name === 'TimeoutError' ||
      name === 'RequestTimeout'
    ) {
      return new BkfsError(
        'STORE_UNAVAILABLE',
        `${where}: cannot ${what}: ${err.code ?? name}${status ? ` (HTTP ${status})` : ''} after retries`,
      );
    }
    return e;
  }
}
