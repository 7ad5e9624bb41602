/**
 * encodeChunk on the zstd binding with a capped scratch buffer (issue 16): the same choices as
 * before (zstd when it saves at least 1/32, raw otherwise), raw without a copy, zstd results that
 * own their ArrayBuffer (transferable from the ingest worker), and round trips through the bounded
 * decoder, also when calls of different sizes and kinds alternate (the scratch buffer is reused).
 */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import { CODEC_RAW, CODEC_ZSTD, decodeChunk, encodeChunk, hashChunk } from '../../src/store/codec';
import { randomBuffer, textFile } from '../helpers/images';

describe('encodeChunk', () => {
  it('stores random data raw as the same buffer, and compressible data as an exact, owned zstd buffer', () => {
    const random = randomBuffer(7, 256 * 1024);
    const r = encodeChunk(random, 1);
    assert.equal(r.codec, CODEC_RAW);
    assert.equal(r.data, random, 'raw result is the input itself, not a copy');

    const text = textFile(7, 256 * 1024).subarray(0, 256 * 1024);
    const z = encodeChunk(text, 1, undefined, 0); // one zstd frame (codec 1); frames: codec-frames.test.ts
    assert.equal(z.codec, CODEC_ZSTD);
    assert.ok(z.data.length < text.length - (text.length >> 5));
    assert.equal(z.data.byteOffset, 0);
    assert.equal(z.data.buffer.byteLength, z.data.length, 'zstd result owns its whole ArrayBuffer');
    assert.deepEqual(decodeChunk(z.data, z.codec, text.length, hashChunk(text)), text);
  });

  it('alternating sizes and kinds reuse the scratch buffer without mixing results', () => {
    const inputs: Buffer[] = [];
    for (let i = 0; i < 24; i++) {
      const size = [4096, 256 * 1024, 1 << 20, 65536][i % 4]!;
      const b = Buffer.from(i % 3 === 0 ? randomBuffer(i, size) : textFile(i, size).subarray(0, size));
      // Half compressible: the first half random, the second text (just around the 1/32 threshold for some).
      if (i % 5 === 0) randomBuffer(100 + i, size >> 1).copy(b);
      inputs.push(b);
    }
    const encoded = inputs.map((b) => encodeChunk(b, 3));
    encoded.forEach((e, i) => {
      const raw = inputs[i]!;
      if (e.codec !== CODEC_RAW) assert.ok(e.data.length < raw.length - (raw.length >> 5));
      assert.deepEqual(decodeChunk(e.data, e.codec, raw.length, hashChunk(raw), 1 << 20), raw);
    });
    assert.ok(encoded.some((e) => e.codec === CODEC_RAW) && encoded.some((e) => e.codec !== CODEC_RAW));
  });

  it('tiny chunks are stored raw', () => {
    const tiny = Buffer.alloc(16, 1);
    const e = encodeChunk(tiny, 1);
    assert.equal(e.codec, CODEC_RAW);
    assert.equal(e.data, tiny);
  });
});
