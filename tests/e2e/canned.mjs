// The texts make_model.mjs gives whole token ids, for the tests to force with logit_bias.
export const CANNED = {
  think: '<think>I should look at the weather first.</think>The answer is sunny.',
  hermes: '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
  coder: '<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n' +
    '</parameter>\n</function>\n</tool_call>',
  r1: 'Two plus two is four.</think>4',
  stopword: ' STOPHERE and more',
};
