/**
 * Length of a chunk hash (BLAKE3, bytes). A module of its own so that reading the catalogue
 * (packs.ts) does not load the hash and compression libraries of codec.ts.
 */
export const HASH_LEN = 32;
