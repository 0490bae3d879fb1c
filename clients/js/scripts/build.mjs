// Builds the SDK into a folder (default dist/): one ESM file, herald.js, bundled
// by esbuild from src/index.ts, plus the .d.ts files from tsc. The test
// test/dist.test.mjs builds into a temporary folder and compares, so the
// committed dist/ (which the server embeds) never drifts from src/.
//
//   node scripts/build.mjs [OUTDIR]

import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { build } from 'esbuild';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const outdir = path.resolve(root, process.argv[2] ?? 'dist');
const { version } = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8'));

// Start clean, so a renamed source file leaves no stale declaration behind.
mkdirSync(outdir, { recursive: true });
for (const name of readdirSync(outdir)) {
  if (name === 'herald.js' || name.endsWith('.d.ts')) rmSync(path.join(outdir, name));
}

await build({
  entryPoints: [path.join(root, 'src/index.ts')],
  outfile: path.join(outdir, 'herald.js'),
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: 'es2020',
  charset: 'utf8',
  legalComments: 'none',
  banner: { js: `// @herald/client ${version} (MIT). Built from src/ by scripts/build.mjs: do not edit.` },
  logLevel: 'warning',
});

const tsc = path.join(root, 'node_modules/typescript/bin/tsc');
execFileSync(process.execPath, [tsc, '-p', root, '--emitDeclarationOnly', '--outDir', outdir], {
  cwd: root,
  stdio: 'inherit',
});
