/**
 * Length of a chunk hash (BLAKE3, bytes), and the codec numbers and chunk size limit of pack
 * records. A module of its own so that reading the catalogue (packs.ts) does not load the hash and
 * compression libraries of codec.ts.
 */
export const HASH_LEN = 32;

export const CODEC_RAW = 0;
export const CODEC_ZSTD = 1;
/** Several independently decodable frames with a frame table (format 4, `codec.ts`). */
export const CODEC_FRAMES = 2;

/**
 * Largest chunk any repository can have (`init` allows chunk sizes up to 16 MiB): a stored or raw
 * length above it is damage (or a hostile file), refused before anything is allocated.
 */
export const MAX_CHUNK_LEN = 16 << 20;

/**
 * Largest frame table a codec-2 chunk of `rawLen` raw bytes can have (frames of the smallest size,
 * 4 KiB): a frames record whose frames are all raw (format 6) stores its raw bytes plus its table.
 */
export function maxFrameTableLen(rawLen: number): number {
  return 4 + Math.ceil(rawLen / 4096) * 21 + 16;
}
