// Writes the model folder the end-to-end tests serve: the llama_gqa golden fixture (its weights, config
// and logits are transformers') with its byte-level BPE tokenizer, in which the ids of the last merges are
// given whole strings instead: a <think> block, a Hermes tool call, a Qwen3-Coder tool call, an R1 thought.
// A request with logit_bias {id: 100} then makes the real model emit exactly that text as one token, so the
// server's reasoning and tool-call parsing is tested on what the engine really generated.
//
// usage: node make_model.mjs OUT_DIR   (prints {"name": id, ...} of the canned tokens)
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CANNED } from './canned.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const fixture = path.join(here, '..', 'golden', 'fixtures', 'llama_gqa', 'model');
const out = process.argv[2];
fs.mkdirSync(out, { recursive: true });


// GPT-2's byte -> unicode alphabet, as tokenizer.json's byte-level vocabulary spells bytes.
function byteToUnicode() {
  const keep = [];
  for (let b = 33; b <= 126; b++) keep.push(b);
  for (let b = 161; b <= 172; b++) keep.push(b);
  for (let b = 174; b <= 255; b++) keep.push(b);
  const map = new Map(keep.map((b) => [b, String.fromCodePoint(b)]));
  let n = 0;
  for (let b = 0; b < 256; b++) if (!map.has(b)) map.set(b, String.fromCodePoint(256 + n++));
  return map;
}

const tok = JSON.parse(fs.readFileSync(path.join(fixture, 'tokenizer.json'), 'utf8'));
const b2u = byteToUnicode();
const names = Object.keys(CANNED);
// The last merges create the highest ids; no earlier merge uses them, so dropping them frees those ids.
tok.model.merges = tok.model.merges.slice(0, tok.model.merges.length - names.length);
const byId = new Map(Object.entries(tok.model.vocab).map(([t, id]) => [id, t]));
const ids = {};
const maxId = Math.max(...byId.keys());
names.forEach((name, i) => {
  const id = maxId - names.length + 1 + i;
  delete tok.model.vocab[byId.get(id)];
  const spelled = [...Buffer.from(CANNED[name], 'utf8')].map((b) => b2u.get(b)).join('');
  tok.model.vocab[spelled] = id;
  ids[name] = id;
});
fs.writeFileSync(path.join(out, 'tokenizer.json'), JSON.stringify(tok));
for (const f of ['config.json', 'tokenizer_config.json', 'model.safetensors']) {
  fs.copyFileSync(path.join(fixture, f), path.join(out, f));
}
fs.writeFileSync(path.join(out, 'canned_ids.json'), JSON.stringify(ids));
console.log(JSON.stringify(ids));
