// The texts make_model.mjs gives whole token ids, for the tests to force with logit_bias.
const HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>';
const CODER = '<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n' +
  '</parameter>\n</function>\n</tool_call>';
// What follows the opening that tool_choice required / named puts at the end of the prompt (docs/api.md).
const after = (text, opening) => {
  if (!text.startsWith(opening)) throw new Error(`${opening} does not open ${text}`);
  return text.slice(opening.length);
};
export const OPENINGS = {
  hermes_required: '<tool_call>\n',
  hermes_named: '<tool_call>\n{"name": "get_weather", "arguments": ',
  coder_required: '<tool_call>\n<function=',
  coder_named: '<tool_call>\n<function=get_weather>\n',
};
export const CANNED = {
  think: '<think>I should look at the weather first.</think>The answer is sunny.',
  hermes: HERMES,
  coder: CODER,
  r1: 'Two plus two is four.</think>4',
  stopword: ' STOPHERE and more',
  hermes_required: after(HERMES, OPENINGS.hermes_required),
  hermes_named: after(HERMES, OPENINGS.hermes_named),
  coder_required: after(CODER, OPENINGS.coder_required),
  coder_named: after(CODER, OPENINGS.coder_named),
};
