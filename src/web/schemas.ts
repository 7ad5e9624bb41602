/** JSON schemas the routes of `bkfs web` share (validation and the OpenAPI document). */

export const nameParam = { type: 'string', maxLength: 128 } as const;

export const vmParams = { type: 'object', properties: { vm: nameParam }, required: ['vm'] } as const;

export const cpParams = {
  type: 'object',
  properties: { vm: nameParam, cp: nameParam },
  required: ['vm', 'cp'],
} as const;

export const diskParams = {
  type: 'object',
  properties: { vm: nameParam, cp: nameParam, disk: nameParam },
  required: ['vm', 'cp', 'disk'],
} as const;

/** Where in a checkpoint: the guest path and the volume (query string). */
export const pathQuery = {
  path: { type: 'string', maxLength: 4096, description: 'absolute guest path' },
  volume: { type: 'string', maxLength: 256, description: 'vda:2, vdb, vg/lv, LABEL=x, UUID=x' },
} as const;
