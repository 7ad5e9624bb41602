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
  UNAUTHORIZED: 31,
  STORE_ACCESS: 33,
  STORE_UNAVAILABLE: 34,
  INTERRUPTED: 130,
};

/**
 * HTTP status of each error code in `bkfs web`'s API (a JSON error carries the code and its exit
 * code too). README's "Exit codes" table repeats this column.
 */
export const HTTP_STATUS: Record<ErrorCode, number> = {
  USAGE: 400,
  BAD_NAME: 400,
  REPO_NOT_FOUND: 503,
  REPO_EXISTS: 409,
  REPO_VERSION: 503,
  REPO_LOCKED: 423,
  NOT_FOUND: 404,
  SOURCE_NOT_FOUND: 404,
  SOURCE_FORMAT: 415,
  SOURCE_IN_USE: 409,
  CHAIN_BROKEN: 409,
  SIZE_CHANGED: 409,
  NBD_PROTOCOL: 502,
  DATA_DAMAGED: 500,
  VERIFY_FAILED: 500,
  TARGET_EXISTS: 409,
  TARGET_INVALID: 400,
  EXTERNAL_TOOL: 502,
  MOUNT_FAILED: 500,
  PROTECTED: 409,
  FS_UNSUPPORTED: 422,
  PERMISSION_DENIED: 403,
  SOURCE_GONE: 410,
  SOURCE_UNSAFE: 400,
  TARGET_MISMATCH: 409,
  REPO_CORRUPT: 500,
  UNAUTHORIZED: 401,
  STORE_ACCESS: 502,
  STORE_UNAVAILABLE: 503,
  INTERRUPTED: 503,
};
