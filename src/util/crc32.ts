/**
 * CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), the checksum GPT headers and partition
 * entry arrays carry. Node 20's zlib has no `crc32`, so this is a small table-driven one.
 * `crc32(Buffer.from('123456789')) === 0xcbf43926`.
 */

const TABLE: Uint32Array = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/**
 * CRC-32 of `data`. Pass the previous result as `prev` to continue a checksum over several
 * buffers: `crc32(b, crc32(a)) === crc32(Buffer.concat([a, b]))`.
 */
export function crc32(data: Uint8Array, prev = 0): number {
  let c = ~prev >>> 0;
  for (let i = 0; i < data.length; i++) {
    c = (TABLE[(c ^ (data[i] as number)) & 0xff] as number) ^ (c >>> 8);
  }
  return ~c >>> 0;
}
