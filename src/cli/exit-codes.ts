/**
 * The one table from error codes to process exit codes. The README repeats it; keep both in step
 * (a unit test checks that every code is listed in the README).
 */
import type { ErrorCode } from '../errors';

export const EXIT_OK = 0;
export const EXIT_INTERNAL = 1;

export const EXIT_CODES: Record<ErrorCode, number> = {
  USAGE: 2,
  BAD_NAME: 3,
  REPO_NOT_FOUND: 4,
  REPO_EXISTS: 5,
  REPO_VERSION: 6,
  REPO_LOCKED: 7,
  NOT_FOUND: 8,
  SOURCE_NOT_FOUND: 9,
  SOURCE_FORMAT: 10,
  SOURCE_IN_USE: 11,
  CHAIN_BROKEN: 12,
  SIZE_CHANGED: 13,
  NBD_PROTOCOL: 14,
  DATA_DAMAGED: 15,
  VERIFY_FAILED: 16,
  TARGET_EXISTS: 17,
  TARGET_INVALID: 18,
  EXTERNAL_TOOL: 19,
  MOUNT_FAILED: 20,
  PROTECTED: 21,
  FS_UNSUPPORTED: 22,
  PERMISSION_DENIED: 23,
  SOURCE_GONE: 24,
  SOURCE_UNSAFE: 25,
  TARGET_MISMATCH: 26,
  REPO_CORRUPT: 27,
  REMOTE_FAILED: 28,
  JOB_INVALID: 29,
  JOB_PARTIAL: 30,
  RECOVERY_FAILED: 32,
  STORE_ACCESS: 33,
  STORE_UNAVAILABLE: 34,
  INTERRUPTED: 130,
};
