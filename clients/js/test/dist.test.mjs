// dist/ is committed (the server embeds dist/herald.js and serves it at
// /sdk/herald.js), so it must be exactly what src/ builds to: this rebuilds
// into a temporary folder and compares every file.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { jsRoot } from './harness.mjs';

const built = (dir) => readdirSync(dir).filter((f) => f === 'herald.js' || f.endsWith('.d.ts')).sort();

test('the committed dist/ is what src/ builds to', { timeout: 60_000 }, () => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'herald-dist-'));
  try {
    execFileSync(process.execPath, [path.join(jsRoot, 'scripts/build.mjs'), out], { cwd: jsRoot, stdio: 'pipe' });
    const committed = path.join(jsRoot, 'dist');
    assert.deepEqual(built(committed), built(out), 'the same files (run `npm run build` and commit dist/)');
    for (const file of built(out)) {
      const want = readFileSync(path.join(out, file), 'utf8');
      const have = readFileSync(path.join(committed, file), 'utf8');
      assert.ok(have === want, `dist/${file} differs from a fresh build: run \`npm run build\` and commit dist/`);
    }
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test('the shipped .d.ts files type an application using the SDK', { timeout: 60_000 }, () => {
  const tsc = path.join(jsRoot, 'node_modules/typescript/bin/tsc');
  const args = ['--noEmit', '--strict', '--target', 'es2020', '--module', 'esnext', '--moduleResolution', 'bundler',
    '--lib', 'es2020,dom', '--ignoreConfig', 'test/types/consumer.ts'];
  try {
    execFileSync(process.execPath, [tsc, ...args], { cwd: jsRoot, stdio: 'pipe', encoding: 'utf8' });
  } catch (e) {
    assert.fail(`tsc: ${e.stdout}${e.stderr}`);
  }
});
