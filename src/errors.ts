/**
 * One error class for everything bkfs reports on purpose.
 *
 * Every failure a user can cause or meet (bad input, missing repository, a chain that cannot be
 * extended, a damaged chunk) is a `BkfsError` with a stable `code`. Core modules throw these and
 * never print; the CLI maps each code to an exit code through the single table in
 * `src/cli/exit-codes.ts`, which the README repeats. Anything that is not a `BkfsError` is a bug and
 * exits with the generic internal-error code.
 */

export type ErrorCode =
  /** Command-line usage: unknown option, missing argument, bad value. */
  | 'USAGE'
  /** A name (VM, disk, checkpoint) with characters that cannot be used. */
  | 'BAD_NAME'
  /** The repository path does not hold a bkfs repository. */
  | 'REPO_NOT_FOUND'
  /** The repository exists already (init). */
  | 'REPO_EXISTS'
  /** The repository was written by a newer bkfs (format version too high). */
  | 'REPO_VERSION'
  /** Another process holds the repository's writer lock. */
  | 'REPO_LOCKED'
  /** A VM or checkpoint that the repository does not have. */
  | 'NOT_FOUND'
  /** A source (image file, socket, URI) that does not exist or cannot be opened. */
  | 'SOURCE_NOT_FOUND'
  /** An image whose format bkfs does not back up (only qcow2 and raw). */
  | 'SOURCE_FORMAT'
  /** An image held open by another process (a running VM). */
  | 'SOURCE_IN_USE'
  /** An incremental/differential backup is not possible (no full, missing or broken bitmap). */
  | 'CHAIN_BROKEN'
  /** A disk's virtual size changed since the parent checkpoint. */
  | 'SIZE_CHANGED'
  /** The NBD server broke the protocol or refused a request. */
  | 'NBD_PROTOCOL'
  /** Stored data failed its hash or could not be decompressed. */
  | 'DATA_DAMAGED'
  /** verify found damage (exit code distinct from a failure to run). */
  | 'VERIFY_FAILED'
  /** A target exists and --force was not given, or a target is unusable. */
  | 'TARGET_EXISTS'
  | 'TARGET_INVALID'
  /** An external program (qemu-img, qemu-nbd, guestfish, virsh) failed. */
  | 'EXTERNAL_TOOL'
  /** The FUSE layer failed to mount or unmount. */
  | 'MOUNT_FAILED'
  /** A protected checkpoint cannot be forgotten (unprotect it first). */
  | 'PROTECTED'
  /** No filesystem bkfs can open: none found, LUKS-encrypted, or not mountable by the engine. */
  | 'FS_UNSUPPORTED'
  /** This user may not read or write a path bkfs needs (the repository, a target, a source). */
  | 'PERMISSION_DENIED'
  /** `verify --source`: the checkpoint's source image no longer exists. */
  | 'SOURCE_GONE'
  /** A source image refers to other files (backing or data file) and its format was not declared. */
  | 'SOURCE_UNSAFE'
  /** `restore --since`: the target does not provably hold the older checkpoint. */
  | 'TARGET_MISMATCH'
  /** A remote hypervisor cannot be reached or authenticated, or the forwarded data path dropped. */
  | 'REMOTE_FAILED'
  /** A repository file (manifest, pin, gc state, pack header) is unreadable or inconsistent. */
  | 'REPO_CORRUPT'
  /** `bkfs web`: a request without valid credentials (no token, unknown token, expired session). */
  | 'UNAUTHORIZED'
  /** `bkfs run`: the job file is not valid (syntax, unknown key, bad value). */
  | 'JOB_INVALID'
  /** `bkfs run`: some VMs (or the retention/gc step) failed; the others were backed up. */
  | 'JOB_PARTIAL'
  /** `instant-restore`: the VM could not be started from the export or its disks not made independent. */
  | 'RECOVERY_FAILED'
  /** The object store refused the credentials or denied access (bad key, secret, or policy). */
  | 'STORE_ACCESS'
  /** The object store cannot be reached or keeps failing (network, timeouts, HTTP 5xx after retries). */
  | 'STORE_UNAVAILABLE'
  /** A TLS connection (NBD over TLS) failed: certificate not trusted, wrong host name, no TLS offered. */
  | 'TLS_FAILED'
  /** The work was interrupted by a signal. */
  | 'INTERRUPTED';

export class BkfsError extends Error {
  readonly code: ErrorCode;
  readonly data: Record<string, unknown> | undefined;

  constructor(code: ErrorCode, message: string, data?: Record<string, unknown>) {
    super(message);
    this.name = 'BkfsError';
    this.code = code;
    this.data = data;
  }
}

export function isBkfsError(e: unknown, code?: ErrorCode): e is BkfsError {
  return e instanceof BkfsError && (code === undefined || e.code === code);
}

/** Message of any thrown value, on one line. */
export function errorMessage(e: unknown): string {
  const msg = e instanceof Error ? e.message : String(e);
  return msg.replace(/\s*\n\s*/g, ' ').trim();
}
