/** Where the repository is when `-r` is not given (a module of its own: the CLI needs it early). */
import * as os from 'node:os';
import * as path from 'node:path';

export function defaultRepoPath(env: NodeJS.ProcessEnv = process.env): string {
  if (env.BKFS_REPO) return env.BKFS_REPO;
  if (process.getuid?.() === 0) return '/var/lib/bkfs';
  const data = env.XDG_DATA_HOME || path.join(os.homedir(), '.local', 'share');
  return path.join(data, 'bkfs');
}
