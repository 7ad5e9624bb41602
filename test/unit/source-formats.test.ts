/** `--disk NAME=SOURCE` format declarations (pure parsing; the images themselves: guests.test.ts). */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import { ImageSource, NbdUriSource, sourceFor } from '../../src/backup/sources';
import { externalReferences } from '../../src/backup/qemu';
import { isBkfsError } from '../../src/errors';

function image(s: unknown): { location: string; declared: string | undefined } {
  assert.ok(s instanceof ImageSource);
  return { location: s.location, declared: s.declared };
}

describe('declared source formats', () => {
  it('raw:PATH and qcow2:PATH declare; --format declares unprefixed paths; others are probed', () => {
    assert.deepEqual(image(sourceFor('raw:/v/a.img', null)), { location: '/v/a.img', declared: 'raw' });
    assert.deepEqual(image(sourceFor('qcow2:/v/a:b.qcow2', null)), {
      location: '/v/a:b.qcow2',
      declared: 'qcow2',
    });
    assert.deepEqual(image(sourceFor('/v/a.img', null, 'raw')), { location: '/v/a.img', declared: 'raw' });
    assert.deepEqual(image(sourceFor('/v/a.img', null)), { location: '/v/a.img', declared: undefined });
    // A prefix that is no format bkfs reads is part of the path.
    assert.deepEqual(image(sourceFor('vmdk:/v/a', null)), { location: 'vmdk:/v/a', declared: undefined });
    assert.ok(sourceFor('nbd+unix:///vda?socket=/run/x.sock', null) instanceof NbdUriSource);
  });

  it('bad declarations fail with one clear error', () => {
    const code = (fn: () => unknown): string => {
      try {
        fn();
      } catch (e) {
        return isBkfsError(e) ? `${e.code}: ${e.message}` : 'OTHER';
      }
      return 'ok';
    };
    assert.match(
      code(() => sourceFor('/v/a.img', null, 'vmdk')),
      /^SOURCE_FORMAT: format 'vmdk'.*raw, qcow2/,
    );
    assert.match(
      code(() => sourceFor('nbd://h/e', null, 'raw')),
      /^USAGE: --format applies to image files/,
    );
  });

  it('names what a probed header refers to', () => {
    assert.deepEqual(
      externalReferences({
        format: 'qcow2',
        'virtual-size': 1,
        'backing-filename': 'x',
        'full-backing-filename': '/etc/shadow',
        'format-specific': { data: { 'data-file': '/dev/sda' } },
      }),
      ['backing file /etc/shadow', 'data file /dev/sda'],
    );
    assert.deepEqual(externalReferences({ format: 'qcow2', 'virtual-size': 1 }), []);
  });
});
