/**
 * Where the web console's built static files are (dist/src/web/ui: index.html, style.css, the
 * compiled app modules and vendor/ with preact and htm), for the server's @fastify/static.
 * Built by `npm run build` (tsconfig.ui.json + scripts/build-ui.ts); see src/web/ui/README.md.
 */
import * as path from 'node:path';

export const UI_ROOT = path.join(__dirname, 'ui');

/** The single-page app's entry: every console route (/, /vms/..., /login) answers with it. */
export const UI_INDEX = 'index.html';
