import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      'no-console': ['error'],
    },
  },
  {
    // gc, verify, rebuild and stats reach packs and manifests only through the repository's
    // ObjectStore (one code path for a local directory and a bucket); local state (the index
    // files, gc-pending.json, tmp/, pins) has its own small modules. See FORMAT.md, "Storage
    // interface".
    files: ['src/repo/gc.ts', 'src/repo/verify.ts', 'src/repo/rebuild.ts', 'src/repo/stats.ts'],
    rules: {
      'no-restricted-imports': [
        'error',
        ...['fs', 'node:fs', 'fs/promises', 'node:fs/promises'].map((name) => ({
          name,
          message:
            'Use the repository store (repo.store / storeFor(dir), src/store/objstore.ts) for packs and manifests, or a local-state module (gc-pending.ts, index-files.ts) for what is local by nature.',
        })),
      ],
    },
  },
  {
    // Only the CLI, tests and benchmarks talk to the user.
    files: ['src/cli/**', 'test/**', 'bench/**', 'scripts/**'],
    rules: { 'no-console': 'off' },
  },
);
