import fs from 'node:fs';
import path from 'node:path';

/** `$QUOTAD_SOCKET`, else the daemon's own default. */
export function defaultSocketPath() {
  if (process.env.QUOTAD_SOCKET) return process.env.QUOTAD_SOCKET;
  const runtime = process.env.XDG_RUNTIME_DIR;
  if (runtime) {
    try {
      if (fs.statSync(runtime).isDirectory()) return path.join(runtime, 'quotad.sock');
    } catch {
      // not there: fall through
    }
  }
  return './quotad.sock';
}
