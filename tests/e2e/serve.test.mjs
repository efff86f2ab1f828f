// End-to-end tests of `nibble serve` through the openai npm client (and plain fetch where the client would
// refuse to send a bad request). Started by e2e_test.cpp, which launches the servers and passes:
//   NIBBLE_MAIN     URL of the golden llama_gqa model with canned tokens; qwen3 reasoning parser, hermes
//                   tool parser, auto tool choice, prefix caching on, --max-model-len 128
//   NIBBLE_CODER    same model; deepseek_r1, qwen3_coder, --api-key sk-e2e, --no-enable-prefix-caching
//   NIBBLE_DEFAULT  the built-in tiny model (no MODEL_DIR)
//   NIBBLE_HYBRID   the golden nemotron_h model (Mamba2 + attention + MoE), served as "hybrid", prefix caching on
//   CANNED_IDS      {"think": id, "hermes": id, ...} (make_model.mjs)
//   GOLDEN          tests/golden/fixtures/llama_gqa/expected.safetensors (transformers' logits)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import OpenAI from 'openai';
import { CANNED, OPENINGS } from './canned.mjs';

const MAIN = process.env.NIBBLE_MAIN;
const CODER = process.env.NIBBLE_CODER;
const DEFAULT = process.env.NIBBLE_DEFAULT;
const HYBRID = process.env.NIBBLE_HYBRID;
const IDS = JSON.parse(process.env.CANNED_IDS);
const KEY = 'sk-e2e';

const main = new OpenAI({ baseURL: `${MAIN}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 120000 });
const coder = new OpenAI({ baseURL: `${CODER}/v1`, apiKey: KEY, maxRetries: 0, timeout: 120000 });
const MODEL = 'tiny';
const user = (text) => [{ role: 'user', content: text }];
const TOOLS = [
  {
    type: 'function',
    function: {
      name: 'get_weather',
      description: 'Weather forecast for a city',
      parameters: {
        type: 'object',
        properties: { city: { type: 'string' }, days: { type: 'integer' } },
        required: ['city'],
      },
    },
  },
  { type: 'function', function: { name: 'get_time', parameters: { type: 'object', properties: {} } } },
];

async function post(base, path, body, headers = {}) {
  const res = await fetch(`${base}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await res.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {}
  return { status: res.status, json, text };
}

async function metric(base, name) {
  const text = await (await fetch(`${base}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(name.includes('{') ? name : name + '{') || l.startsWith(name + ' '));
  assert.ok(line, `${name} missing from /metrics`);
  return Number(line.split(' ').pop());
}

async function greedy(client, prompt, maxTokens = 24) {
  const r = await client.completions.create({
    model: MODEL, prompt, max_tokens: maxTokens, temperature: 0, ignore_eos: true,
  });
  return r.choices[0].text;
}

// Streams a chat request and gathers what the deltas carry.
async function streamChat(client, params) {
  const stream = await client.chat.completions.create({ ...params, stream: true });
  const out = { content: '', reasoning: '', toolCalls: [], finish: null, usage: null, chunks: 0 };
  for await (const chunk of stream) {
    out.chunks++;
    if (chunk.usage) out.usage = chunk.usage;
    for (const c of chunk.choices) {
      if (c.delta.content) out.content += c.delta.content;
      if (c.delta.reasoning_content) out.reasoning += c.delta.reasoning_content;
      for (const t of c.delta.tool_calls ?? []) {
        if (!out.toolCalls[t.index]) out.toolCalls[t.index] = { id: t.id, name: '', arguments: '' };
        if (t.function?.name) out.toolCalls[t.index].name += t.function.name;
        if (t.function?.arguments) out.toolCalls[t.index].arguments += t.function.arguments;
      }
      if (c.finish_reason) out.finish = c.finish_reason;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------

test('health, models and metrics endpoints', async () => {
  assert.equal((await fetch(`${MAIN}/health`)).status, 200);
  const models = await main.models.list();
  assert.equal(models.data[0].id, MODEL);
  assert.equal(models.data[0].max_model_len, 128);
  const text = await (await fetch(`${MAIN}/metrics`)).text();
  for (const name of ['nibble:num_requests_running', 'nibble:num_requests_waiting', 'nibble:kv_cache_usage_perc',
    'nibble:prefix_cache_hit_rate', 'nibble:prompt_tokens_total', 'nibble:generation_tokens_total',
    'nibble:time_to_first_token_seconds_bucket', 'nibble:inter_token_latency_seconds_bucket']) {
    assert.ok(text.includes(name), name);
  }
  assert.match(text, /# TYPE nibble:time_to_first_token_seconds histogram/);
});

test('chat completion, whole and streamed, agree under greedy decoding', async () => {
  const params = { model: MODEL, messages: user('Hello there'), max_tokens: 12, temperature: 0, ignore_eos: true };
  const whole = await main.chat.completions.create(params);
  assert.equal(whole.object, 'chat.completion');
  assert.equal(whole.choices[0].message.role, 'assistant');
  assert.equal(whole.choices[0].finish_reason, 'length');
  assert.equal(whole.usage.completion_tokens, 12);
  assert.ok(whole.usage.prompt_tokens > 0);
  assert.equal(whole.usage.total_tokens, whole.usage.prompt_tokens + 12);
  const streamed = await streamChat(main, { ...params, stream_options: { include_usage: true } });
  assert.equal(streamed.content, whole.choices[0].message.content);
  assert.equal(streamed.finish, 'length');
  assert.equal(streamed.usage.completion_tokens, 12);
  assert.equal(streamed.usage.prompt_tokens, whole.usage.prompt_tokens);
  assert.ok('prompt_tokens_details' in streamed.usage);
});

test('text completion, whole and streamed; n choices; echo', async () => {
  const whole = await main.completions.create({ model: MODEL, prompt: 'Once upon a time', max_tokens: 10, temperature: 0, ignore_eos: true });
  assert.equal(whole.object, 'text_completion');
  const stream = await main.completions.create({ model: MODEL, prompt: 'Once upon a time', max_tokens: 10, temperature: 0, ignore_eos: true, stream: true });
  let text = '';
  let finish = null;
  for await (const chunk of stream) {
    text += chunk.choices[0]?.text ?? '';
    finish = chunk.choices[0]?.finish_reason ?? finish;
  }
  assert.equal(text, whole.choices[0].text);
  assert.equal(finish, 'length');
  const three = await main.completions.create({ model: MODEL, prompt: 'Once upon a time', max_tokens: 5, temperature: 0, n: 3, ignore_eos: true });
  assert.equal(three.choices.length, 3);
  for (const c of three.choices) assert.equal(c.text, three.choices[0].text);  // greedy: all alike
  assert.equal(three.usage.completion_tokens, 15);
  const echo = await main.completions.create({ model: MODEL, prompt: 'Once upon a time', max_tokens: 3, temperature: 0, echo: true, ignore_eos: true });
  assert.ok(echo.choices[0].text.startsWith('Once upon a time'));
});

test('stop strings cut the text before the stop and end the sequence', async () => {
  const full = await greedy(main, 'The quick brown fox', 24);
  const probe = full.slice(8, 11);
  const cut = full.slice(0, full.indexOf(probe));
  for (const stream of [false, true]) {
    const r = await main.completions.create({ model: MODEL, prompt: 'The quick brown fox', max_tokens: 24, temperature: 0, ignore_eos: true, stop: [probe], stream });
    if (stream) {
      let text = '';
      let finish = null;
      for await (const chunk of r) {
        text += chunk.choices[0]?.text ?? '';
        finish = chunk.choices[0]?.finish_reason ?? finish;
      }
      assert.equal(text, cut);
      assert.equal(finish, 'stop');
    } else {
      assert.equal(r.choices[0].text, cut);
      assert.equal(r.choices[0].finish_reason, 'stop');
    }
  }
  // A stop string inside one generated token (the canned " STOPHERE and more").
  const c = await main.completions.create({ model: MODEL, prompt: 'Hi', max_tokens: 4, temperature: 0, logit_bias: { [IDS.stopword]: 100 }, stop: ['HERE'] });
  assert.equal(c.choices[0].text, ' STOP');
  assert.equal(c.choices[0].finish_reason, 'stop');
  assert.equal(await metric(MAIN, 'nibble:num_requests_running'), 0);
});

// transformers' logits for the fixture's tokens: the server's logprobs must be their log-softmax.
function goldenLogits() {
  const buf = fs.readFileSync(process.env.GOLDEN);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8'));
  const data = 8 + n;
  const [lb, le] = header.logits.data_offsets;
  const [rows, vocab] = header.logits.shape;
  const logits = new Float32Array(buf.buffer.slice(buf.byteOffset + data + lb, buf.byteOffset + data + le));
  const [tb, te] = header.tokens.data_offsets;
  const tokens = Array.from(new Int32Array(buf.buffer.slice(buf.byteOffset + data + tb, buf.byteOffset + data + te)));
  const meta = header.__metadata__;
  // golden_test.cpp's logit tolerance; a log-softmax moves by at most twice a logit's error.
  const tol = Math.max(8 * Number(meta.fp64_gap), 1e-5 * Math.max(1, Number(meta.max_abs_logit)));
  return { logits, tokens, rows, vocab, tol: 2 * tol + 1e-6 };
}

test('logprobs equal the log-softmax of transformers logits', async () => {
  const g = goldenLogits();
  for (const k of [1, 7, 16, 17, 33, 40]) {
    const row = Array.from(g.logits.subarray((k - 1) * g.vocab, k * g.vocab));
    const max = Math.max(...row);
    const lse = max + Math.log(row.reduce((s, x) => s + Math.exp(x - max), 0));
    const ref = row.map((x) => x - lse);
    const r = await main.completions.create({
      model: MODEL, prompt: g.tokens.slice(0, k), max_tokens: 1, temperature: 0, logprobs: 5,
      return_tokens_as_token_ids: true, ignore_eos: true,
    });
    const lp = r.choices[0].logprobs;
    const chosen = Number(lp.tokens[0].split(':')[1]);
    assert.ok(Math.abs(lp.token_logprobs[0] - ref[chosen]) <= g.tol, `k=${k}: chosen ${chosen}`);
    assert.ok(ref[chosen] >= Math.max(...ref) - g.tol, `k=${k}: greedy chose ${chosen}, not the argmax`);
    const top = Object.entries(lp.top_logprobs[0]);
    assert.equal(top.length, 5);
    const fifth = [...ref].sort((a, b) => b - a)[4];
    for (const [tok, value] of top) {
      const id = Number(tok.split(':')[1]);
      assert.ok(Math.abs(value - ref[id]) <= g.tol, `k=${k} id ${id}: ${value} vs ${ref[id]}`);
      assert.ok(ref[id] >= fifth - g.tol, `k=${k}: id ${id} is not among the 5 most likely`);
    }
  }
  // Chat logprobs come as a list with top_logprobs entries.
  const chat = await main.chat.completions.create({ model: MODEL, messages: user('Hi'), max_tokens: 3, temperature: 0, logprobs: true, top_logprobs: 2, ignore_eos: true });
  assert.equal(chat.choices[0].logprobs.content.length, 3);
  assert.equal(chat.choices[0].logprobs.content[0].top_logprobs.length, 2);
});

test('the same seed gives the same sample', async () => {
  const params = { model: MODEL, prompt: 'Hello', max_tokens: 16, temperature: 1.0, ignore_eos: true };
  const a = await main.completions.create({ ...params, seed: 7 });
  const b = await main.completions.create({ ...params, seed: 7 });
  assert.equal(a.choices[0].text, b.choices[0].text);
  const others = await Promise.all([1, 2, 3].map((seed) => main.completions.create({ ...params, seed })));
  assert.ok(others.some((o) => o.choices[0].text !== a.choices[0].text), 'different seeds all gave the same text');
});

test('reasoning (qwen3 parser) is split into reasoning_content, also streamed', async () => {
  const params = { model: MODEL, messages: user('Weather?'), max_tokens: 1, logit_bias: { [IDS.think]: 100 } };
  const r = await main.chat.completions.create(params);
  assert.equal(r.choices[0].message.reasoning_content, 'I should look at the weather first.');
  assert.equal(r.choices[0].message.content, 'The answer is sunny.');
  const s = await streamChat(main, params);
  assert.equal(s.reasoning, 'I should look at the weather first.');
  assert.equal(s.content, 'The answer is sunny.');
});

test('tool calls (hermes parser): auto, none; whole and streamed', async () => {
  const params = { model: MODEL, messages: user('Weather in Paris?'), tools: TOOLS, max_tokens: 1, logit_bias: { [IDS.hermes]: 100 } };
  const r = await main.chat.completions.create(params);
  const msg = r.choices[0].message;
  assert.equal(r.choices[0].finish_reason, 'tool_calls');
  assert.equal(msg.tool_calls.length, 1);
  assert.equal(msg.tool_calls[0].type, 'function');
  assert.equal(msg.tool_calls[0].function.name, 'get_weather');
  assert.deepEqual(JSON.parse(msg.tool_calls[0].function.arguments), { city: 'Paris', days: 3 });
  assert.ok(msg.tool_calls[0].id);
  const s = await streamChat(main, params);
  assert.equal(s.finish, 'tool_calls');
  assert.equal(s.toolCalls.length, 1);
  assert.equal(s.toolCalls[0].name, 'get_weather');
  assert.deepEqual(JSON.parse(s.toolCalls[0].arguments), { city: 'Paris', days: 3 });
  // tool_choice none: the text stays text.
  const none = await main.chat.completions.create({ ...params, tool_choice: 'none' });
  assert.equal(none.choices[0].message.content, CANNED.hermes);
  assert.ok(!none.choices[0].message.tool_calls?.length);
  // A follow-up turn carrying the call and its result renders and runs.
  const follow = await main.chat.completions.create({
    model: MODEL, tools: TOOLS, max_tokens: 2, temperature: 0,
    messages: [...user('Weather in Paris?'), msg, { role: 'tool', tool_call_id: msg.tool_calls[0].id, content: 'sunny' }],
  });
  assert.equal(follow.choices[0].message.role, 'assistant');
});

// tool_choice required / named: the prompt ends with the opening of a call (OPENINGS), and logit_bias makes
// the model write exactly the rest of the canned call; the response must carry the whole call.
async function expectForcedCall(client, params, opening, what) {
  const r = await client.chat.completions.create(params);
  // The prompt the model saw is the rendered chat plus the opening: count it through /tokenize.
  const base = client === main ? MAIN : CODER;
  const auth = client === main ? {} : { authorization: `Bearer ${KEY}` };
  const rendered = await post(base, '/tokenize', { model: MODEL, messages: params.messages, tools: params.tools }, auth);
  const text = (await post(base, '/detokenize', { model: MODEL, tokens: rendered.json.tokens }, auth)).json.prompt;
  const withOpening = await post(base, '/tokenize', { model: MODEL, prompt: text + opening, add_special_tokens: false }, auth);
  assert.equal(r.usage.prompt_tokens, withOpening.json.count, what);
  assert.ok(withOpening.json.count > rendered.json.count, what);
  assert.equal(r.choices[0].finish_reason, 'tool_calls', what);
  assert.equal(r.choices[0].message.content, null, what);
  assert.equal(r.choices[0].message.tool_calls.length, 1, what);
  assert.equal(r.choices[0].message.tool_calls[0].function.name, 'get_weather', what);
  assert.deepEqual(JSON.parse(r.choices[0].message.tool_calls[0].function.arguments), { city: 'Paris', days: 3 }, what);
  const s = await streamChat(client, params);
  assert.equal(s.finish, 'tool_calls', what);
  assert.equal(s.content, '', what);
  assert.equal(s.toolCalls.length, 1, what);
  assert.equal(s.toolCalls[0].name, 'get_weather', what);
  assert.deepEqual(JSON.parse(s.toolCalls[0].arguments), { city: 'Paris', days: 3 }, what);
}

// Cut off after one token that does not finish the call: finish length, no call, only the model's text.
async function expectCutOffCall(client, params, opening, what) {
  const r = await client.chat.completions.create({ ...params, max_tokens: 1, temperature: 0, ignore_eos: true, logprobs: true });
  const c = r.choices[0];
  assert.equal(c.finish_reason, 'length', what);
  assert.ok(!c.message.tool_calls?.length, what);
  assert.equal(c.message.content ?? '', c.logprobs.content[0].token, what);
  assert.ok(!(c.message.content ?? '').includes(opening), what);
}

const WEATHER = { type: 'function', function: { name: 'get_weather' } };

test('tool_choice required and named (hermes): the prompt opens the call, the model completes it', async () => {
  const base = { model: MODEL, messages: user('Weather in Paris?'), tools: TOOLS, max_tokens: 1 };
  await expectForcedCall(main, { ...base, tool_choice: 'required', logit_bias: { [IDS.hermes_required]: 100 } }, OPENINGS.hermes_required, 'required');
  await expectForcedCall(main, { ...base, tool_choice: WEATHER, logit_bias: { [IDS.hermes_named]: 100 } }, OPENINGS.hermes_named, 'named');
  await expectCutOffCall(main, { ...base, tool_choice: 'required' }, OPENINGS.hermes_required, 'required, cut off');
  await expectCutOffCall(main, { ...base, tool_choice: WEATHER }, OPENINGS.hermes_named, 'named, cut off');
});

test('every bad input gets an OpenAI error object and the right 4xx', async () => {
  const cases = [
    ['{"messages": [', 400, null],
    [{ model: MODEL, messages: user('x'), temperature: 'hot' }, 400, 'temperature'],
    [{ model: MODEL, messages: user('x'), temperature: 3 }, 400, 'temperature'],
    [{ model: MODEL, messages: user('x'), top_p: 0 }, 400, 'top_p'],
    [{ model: MODEL }, 400, 'messages'],
    [{ model: MODEL, messages: [] }, 400, 'messages'],
    [{ model: MODEL, messages: [{ role: 'wizard', content: 'x' }] }, 400, 'messages[0].role'],
    [{ model: MODEL, messages: 'hello' }, 400, 'messages'],
    [{ model: 'gpt-4', messages: user('x') }, 404, 'model'],
    [{ model: MODEL, messages: user('x'), max_tokens: 1000 }, 400, 'max_tokens'],
    [{ model: MODEL, messages: user('x'), max_tokens: 0 }, 400, 'max_tokens'],
    [{ model: MODEL, messages: user('x'), n: 0 }, 400, 'n'],
    [{ model: MODEL, messages: user('x'), n: 100000 }, 400, 'n'],
    [{ model: MODEL, messages: user('x'), logit_bias: { 99999: 1 } }, 400, 'logit_bias'],
    [{ model: MODEL, messages: user('x'), stream_options: { include_usage: true } }, 400, 'stream_options'],
    [{ model: MODEL, messages: user('x'), tool_choice: 'required' }, 400, 'tool_choice'],
    [{ model: MODEL, messages: user('x'), tool_choice: WEATHER }, 400, 'tool_choice'],
    [{ model: MODEL, messages: user('x'), tools: TOOLS, tool_choice: { type: 'function', function: { name: 'nope' } } }, 400, 'tool_choice'],
    [{ model: MODEL, messages: user('x'.repeat(400)) }, 400, 'messages'],
  ];
  for (const [body, status, param] of cases) {
    const r = await post(MAIN, '/v1/chat/completions', body);
    assert.equal(r.status, status, `${JSON.stringify(body).slice(0, 80)} -> ${r.text}`);
    assert.equal(typeof r.json.error.message, 'string');
    assert.equal(typeof r.json.error.type, 'string');
    assert.ok('param' in r.json.error && 'code' in r.json.error);
    if (param) assert.equal(r.json.error.param, param, r.text);
  }
  const comp = await post(MAIN, '/v1/completions', { model: MODEL, prompt: 5 });
  assert.equal(comp.status, 400);
  assert.equal((await post(MAIN, '/v1/nothing', {})).status, 404);
  // A body over the size limit (32 MiB) is refused before it is parsed.
  let big = null;
  try {
    big = await post(MAIN, '/v1/chat/completions', '{"pad": "' + 'x'.repeat(33 << 20) + '"}');
  } catch (e) {
    big = { status: 'connection closed', error: e };
  }
  assert.equal(big.status, 413);
  // The openai client surfaces them as typed errors.
  await assert.rejects(main.chat.completions.create({ model: 'nope', messages: user('x') }), (e) => e.status === 404);
  // And the server is still fine.
  assert.equal((await fetch(`${MAIN}/health`)).status, 200);
});

test('a client disconnecting mid-stream has its request aborted', async () => {
  const abortsBefore = await metric(MAIN, 'nibble:request_success_total{model_name="tiny",finished_reason="abort"}');
  const tokensBefore = await metric(MAIN, 'nibble:generation_tokens_total');
  const controller = new AbortController();
  const stream = await main.chat.completions.create(
    // 64 choices of 100 tokens: long enough on this tiny model that the client leaves well before the end.
    { model: MODEL, messages: user('Tell me a long story'), max_tokens: 100, n: 64, ignore_eos: true, stream: true },
    { signal: controller.signal });
  let seen = 0;
  try {
    for await (const chunk of stream) {
      if (++seen === 3) controller.abort();
    }
  } catch {}
  assert.ok(seen >= 3);
  let running = -1;
  for (let i = 0; i < 50; i++) {
    running = await metric(MAIN, 'nibble:num_requests_running');
    if (running === 0) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(running, 0);
  assert.equal(await metric(MAIN, 'nibble:num_requests_waiting'), 0);
  assert.equal(await metric(MAIN, 'nibble:kv_cache_usage_perc'), 0);
  // It was cut short, not run to its 64 x 100 tokens.
  assert.equal(await metric(MAIN, 'nibble:request_success_total{model_name="tiny",finished_reason="abort"}'), abortsBefore + 1);
  const generated = (await metric(MAIN, 'nibble:generation_tokens_total')) - tokensBefore;
  assert.ok(generated < 64 * 100, `${generated} tokens generated: the request ran to its end`);
  console.log(`# disconnect: ${generated} tokens generated in all`);
});

test('greedy output is the same alone and among 32 concurrent requests', async () => {
  const prompt = 'Once upon a time there was a small model';
  const alone = await greedy(main, prompt, 24);
  const prompts = Array.from({ length: 32 }, (_, i) => (i === 13 ? prompt : `Request ${i}: ${'abc '.repeat(i % 7)}`));
  const results = await Promise.all(prompts.map((p) => greedy(main, p, 24)));
  assert.equal(results[13], alone);
  // Without prefix caching (the coder server) the tokens are the same too.
  assert.equal(await greedy(coder, prompt, 24), alone);
});

test('a repeated prompt reports cached tokens; not without prefix caching', async () => {
  // Digits barely merge in the fixture's tokenizer: about two tokens per pair, over two full blocks.
  const prompt = 'Numbers: ' + '0 1 2 3 4 5 6 7 8 9 '.repeat(2);
  const first = await main.completions.create({ model: MODEL, prompt, max_tokens: 2, temperature: 0 });
  const second = await main.completions.create({ model: MODEL, prompt, max_tokens: 2, temperature: 0 });
  const p = second.usage.prompt_tokens;
  assert.ok(p >= 32, `prompt of ${p} tokens is too short for two full blocks`);
  const cached = second.usage.prompt_tokens_details.cached_tokens;
  assert.ok(cached >= 16 * Math.floor((p - 1) / 16) && cached < p, `cached ${cached} of ${p}`);
  assert.equal(first.choices[0].text, second.choices[0].text);
  const c1 = await coder.completions.create({ model: MODEL, prompt, max_tokens: 2, temperature: 0 });
  const c2 = await coder.completions.create({ model: MODEL, prompt, max_tokens: 2, temperature: 0 });
  assert.equal(c2.usage.prompt_tokens_details.cached_tokens, 0);
  assert.equal(c1.choices[0].text, first.choices[0].text);
  assert.ok((await metric(MAIN, 'nibble:prefix_cache_hits_total')) > 0);
});

test('a hybrid model resumes a repeated prompt from a Mamba state snapshot and reports the cached tokens', async () => {
  const hybrid = new OpenAI({ baseURL: `${HYBRID}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 120000 });
  const prompt = 'Numbers: ' + '0 1 2 3 4 5 6 7 8 9 '.repeat(3);
  const ask = () => hybrid.completions.create({ model: 'hybrid', prompt, max_tokens: 8, temperature: 0, ignore_eos: true });
  const first = await ask();
  const second = await ask();
  const p = second.usage.prompt_tokens;
  assert.ok(p >= 33, `prompt of ${p} tokens is too short for two reusable blocks`);
  assert.equal(first.usage.prompt_tokens_details.cached_tokens, 0);
  // The first request kept the state at its last reusable block boundary (scheduler.h): all of it is reused.
  assert.equal(second.usage.prompt_tokens_details.cached_tokens, 16 * Math.floor((p - 1) / 16));
  assert.equal(second.choices[0].text, first.choices[0].text);
  assert.ok((await metric(HYBRID, 'nibble:prefix_cache_hits_total')) > 0);
});

test('64 concurrent streams all complete', async () => {
  const runs = await Promise.all(Array.from({ length: 64 }, (_, i) => streamChat(main, {
    model: MODEL, messages: user(`stream ${i}`), max_tokens: 16, ignore_eos: true, temperature: 0.8, seed: i,
    stream_options: { include_usage: true },
  })));
  for (const r of runs) {
    assert.equal(r.finish, 'length');
    assert.equal(r.usage.completion_tokens, 16);
  }
  assert.equal(await metric(MAIN, 'nibble:num_requests_running'), 0);
});

test('tokenize and detokenize as vLLM has them', async () => {
  const t = await post(MAIN, '/tokenize', { model: MODEL, prompt: 'Hello, world!' });
  assert.equal(t.status, 200);
  assert.equal(t.json.count, t.json.tokens.length);
  assert.equal(t.json.max_model_len, 128);
  const d = await post(MAIN, '/detokenize', { model: MODEL, tokens: t.json.tokens });
  assert.equal(d.json.prompt, 'Hello, world!');
  const chat = await post(MAIN, '/tokenize', { model: MODEL, messages: user('Hi') });
  const rendered = await post(MAIN, '/detokenize', { tokens: chat.json.tokens });
  assert.equal(rendered.json.prompt, '<|endoftext|>user\nHi\n<|endoftext|>assistant\n');
  assert.equal((await post(MAIN, '/detokenize', { tokens: [-1] })).status, 400);
});

// --- the second server: API key, qwen3_coder, deepseek_r1, no prefix caching ------------------------------

test('API key: 401 without or with a wrong key, 200 with it', async () => {
  const body = { model: MODEL, messages: user('x'), max_tokens: 1 };
  const none = await post(CODER, '/v1/chat/completions', body);
  assert.equal(none.status, 401);
  assert.equal(typeof none.json.error.message, 'string');
  assert.equal((await post(CODER, '/v1/chat/completions', body, { authorization: 'Bearer sk-wrong' })).status, 401);
  assert.equal((await post(CODER, '/v1/chat/completions', body, { authorization: `Bearer ${KEY}` })).status, 200);
  assert.equal((await fetch(`${CODER}/v1/models`)).status, 401);
  assert.equal((await fetch(`${CODER}/health`)).status, 200);
  const wrong = new OpenAI({ baseURL: `${CODER}/v1`, apiKey: 'sk-wrong', maxRetries: 0 });
  await assert.rejects(wrong.models.list(), (e) => e.status === 401);
});

test('tool calls (qwen3_coder parser) with schema-typed parameters', async () => {
  const params = { model: MODEL, messages: user('Weather?'), tools: TOOLS, max_tokens: 1, logit_bias: { [IDS.coder]: 100 } };
  // deepseek_r1 starts in reasoning: the canned call would be thought. Close the block in the prompt, as
  // a template with thinking disabled does.
  params.messages = [...params.messages, { role: 'assistant', content: '<think></think>' }];
  params.continue_final_message = true;
  params.add_generation_prompt = false;
  const r = await coder.chat.completions.create(params);
  assert.equal(r.choices[0].finish_reason, 'tool_calls');
  const call = r.choices[0].message.tool_calls[0];
  assert.equal(call.function.name, 'get_weather');
  assert.deepEqual(JSON.parse(call.function.arguments), { city: 'Paris', days: 3 });
  const s = await streamChat(coder, params);
  assert.deepEqual(JSON.parse(s.toolCalls[0].arguments), { city: 'Paris', days: 3 });
});

test('tool_choice required and named (qwen3_coder): the prompt opens the call, the model completes it', async () => {
  // deepseek_r1 would start the output in reasoning; a forced call is not thought, so no <think></think>.
  const base = { model: MODEL, messages: user('Weather?'), tools: TOOLS, max_tokens: 1 };
  await expectForcedCall(coder, { ...base, tool_choice: 'required', logit_bias: { [IDS.coder_required]: 100 } }, OPENINGS.coder_required, 'required');
  await expectForcedCall(coder, { ...base, tool_choice: WEATHER, logit_bias: { [IDS.coder_named]: 100 } }, OPENINGS.coder_named, 'named');
  await expectCutOffCall(coder, { ...base, tool_choice: 'required' }, OPENINGS.coder_required, 'required, cut off');
  await expectCutOffCall(coder, { ...base, tool_choice: WEATHER }, OPENINGS.coder_named, 'named, cut off');
});

test('reasoning (deepseek_r1 parser) starts in the thought', async () => {
  const params = { model: MODEL, messages: user('2+2?'), max_tokens: 1, logit_bias: { [IDS.r1]: 100 } };
  const r = await coder.chat.completions.create(params);
  assert.equal(r.choices[0].message.reasoning_content, 'Two plus two is four.');
  assert.equal(r.choices[0].message.content, '4');
  const s = await streamChat(coder, params);
  assert.equal(s.reasoning, 'Two plus two is four.');
  assert.equal(s.content, '4');
});

// --- the built-in default model ------------------------------------------------------------------------

test('the built-in tiny model serves chat', async () => {
  const client = new OpenAI({ baseURL: `${DEFAULT}/v1`, apiKey: 'unused', maxRetries: 0 });
  const models = await client.models.list();
  assert.equal(models.data[0].id, 'nibble-tiny-random');
  const r = await client.chat.completions.create({ model: 'nibble-tiny-random', messages: user('Hello!'), max_tokens: 8 });
  assert.equal(typeof r.choices[0].message.content, 'string');
  assert.ok(['stop', 'length'].includes(r.choices[0].finish_reason));
  assert.ok(r.usage.completion_tokens >= 1);
  // No --tool-call-parser: required and named choices cannot be made to work, so they are refused.
  for (const tool_choice of ['required', WEATHER]) {
    const bad = await post(DEFAULT, '/v1/chat/completions', { messages: user('x'), tools: TOOLS, tool_choice });
    assert.equal(bad.status, 400, bad.text);
    assert.equal(bad.json.error.param, 'tool_choice');
  }
});
