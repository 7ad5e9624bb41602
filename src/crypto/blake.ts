/**
 * The native BLAKE3 binding (`@napi-rs/blake-hash`), loaded on first use. Modules on the path of
 * commands that hash nothing (`bkfs list`, `info`, `snapshots`) take it from here so that their
 * start-up does not load the addon (about 7 ms of the CLI's ~40 ms of its own start-up).
 */
type BlakeHash = typeof import('@napi-rs/blake-hash');

let mod: BlakeHash | undefined;

export function blakeHash(): BlakeHash {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return (mod ??= require('@napi-rs/blake-hash') as BlakeHash);
}
