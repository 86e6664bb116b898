// Drives a running flashmoe server with the official Node SDKs: `openai` (chat completions,
// its stream and parse helpers, the tool runner, zod structured output, logprobs, n, the
// Responses API, typed errors) and `@anthropic-ai/sdk` (Messages, streamed and whole, tool use).
// Usage: node tests/node_clients.mjs BASE_URL MODULES_DIR (where npm installed the packages)
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import path from "node:path";

// the packages live in the directory the test installed them to (argv[3])
const require = createRequire(path.join(process.argv[3], "package.json"));
const { default: OpenAI } = await import(require.resolve("openai"));
const { zodResponseFormat, zodTextFormat } = await import(require.resolve("openai/helpers/zod"));
const { default: Anthropic } = await import(require.resolve("@anthropic-ai/sdk"));
const { z } = await import(require.resolve("zod"));

const base = process.argv[2];
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "not-needed" });
const models = await client.models.list();
const model = models.data[0].id;
assert.equal(model, "flashmoe-default");
assert.equal((await client.models.retrieve(model)).id, model);
const ask = [{ role: "user", content: "Speak as ROMEO." }];

// streamed chat by async iteration, then the stream helper's accumulated completion, then whole
let streamed = "";
let finish = null;
for await (const chunk of await client.chat.completions.create({ model, messages: ask, max_tokens: 24, temperature: 0, stream: true })) {
  streamed += chunk.choices[0]?.delta?.content ?? "";
  finish = chunk.choices[0]?.finish_reason ?? finish;
}
assert.ok(streamed && ["stop", "length"].includes(finish), `${streamed} / ${finish}`);
const helper = client.chat.completions.stream({ model, messages: ask, max_tokens: 24, temperature: 0, stream_options: { include_usage: true } });
let pieces = "";
helper.on("content", (delta) => { pieces += delta; });
const acc = await helper.finalChatCompletion();
assert.equal(pieces, streamed);
assert.equal(acc.choices[0].message.content, streamed);
assert.equal(acc.usage.total_tokens, acc.usage.prompt_tokens + acc.usage.completion_tokens);
const whole = await client.chat.completions.create({ model, messages: ask, max_tokens: 24, temperature: 0 });
assert.equal(whole.choices[0].message.content, streamed);

// the tool runner: the model calls get_weather, the runner calls our function and sends its result
const tools = [{ type: "function", function: { name: "get_weather", description: "Current weather in a city",
  parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } } }];
const called = [];
const runner = client.chat.completions.runTools({
  model, temperature: 0, max_tokens: 60,
  messages: [{ role: "user", content: "What is the weather in Mantua?" }],
  tools: [{ type: "function", function: { ...tools[0].function, parse: JSON.parse,
    function: (args) => { called.push(args); return { city: args.city, weather: "foggy", temperature: 9 }; } } }],
});
const answer = await runner.finalContent();
assert.deepEqual(called, [{ city: "Mantua" }]);
assert.ok(answer.includes("Mantua") && answer.includes("foggy"), answer);
// the same call streamed: its arguments arrive in deltas that make the whole call
const callStream = client.chat.completions.stream({ model, temperature: 0, max_tokens: 60, tools,
  messages: [{ role: "user", content: "What is the weather in Mantua?" }] });
const sc = await callStream.finalChatCompletion();
assert.equal(sc.choices[0].finish_reason, "tool_calls");
assert.equal(JSON.parse(sc.choices[0].message.tool_calls[0].function.arguments).city, "Mantua");

// structured output: a zod schema through parse (json_schema, strict), and json_object
const Line = z.object({ speaker: z.enum(["ROMEO", "JULIET", "NURSE"]), mood: z.enum(["happy", "sad"]), aside: z.boolean() });
const parsed = await client.chat.completions.parse({ model, temperature: 0, max_tokens: 60,
  messages: [{ role: "user", content: "Who speaks?" }], response_format: zodResponseFormat(Line, "line") });
assert.equal(parsed.choices[0].finish_reason, "stop");
assert.ok(Line.safeParse(parsed.choices[0].message.parsed).success, JSON.stringify(parsed.choices[0].message));
const obj = await client.chat.completions.create({ model, messages: ask, temperature: 0.8, seed: 7, max_tokens: 200,
  response_format: { type: "json_object" } });
assert.equal(typeof JSON.parse(obj.choices[0].message.content), "object");

// a required call and a named one, where the model would answer in words
const req = await client.chat.completions.create({ model, messages: ask, tools, tool_choice: "required", temperature: 0, max_tokens: 80 });
assert.equal(req.choices[0].finish_reason, "tool_calls");
assert.equal(typeof JSON.parse(req.choices[0].message.tool_calls[0].function.arguments).city, "string");

// logprobs: greedy, so the chosen token tops its list; streamed the same
const lpArgs = { model, messages: ask, max_tokens: 8, temperature: 0, logprobs: true, top_logprobs: 3 };
const lp = (await client.chat.completions.create(lpArgs)).choices[0].logprobs.content;
assert.ok(lp.length > 0);
for (const t of lp) {
  assert.ok(t.logprob <= 0 && t.top_logprobs.length === 3);
  assert.equal(t.top_logprobs[0].token, t.token);
}
const slp = [];
for await (const c of await client.chat.completions.create({ ...lpArgs, stream: true })) {
  slp.push(...(c.choices[0]?.logprobs?.content ?? []));
}
assert.deepEqual(slp.map((t) => [t.token, t.logprob]), lp.map((t) => [t.token, t.logprob]));

// n choices, indexed, whole and streamed alike
const nArgs = { model, messages: ask, n: 2, max_tokens: 8, temperature: 1, seed: 3 };
const two = await client.chat.completions.create(nArgs);
assert.deepEqual(two.choices.map((c) => c.index), [0, 1]);
const texts = ["", ""];
for await (const c of await client.chat.completions.create({ ...nArgs, stream: true })) {
  for (const ch of c.choices) texts[ch.index] += ch.delta.content ?? "";
}
assert.deepEqual(texts, two.choices.map((c) => c.message.content));

// the Responses API: whole, streamed through the helper, a forced function call, zod text format
const r = await client.responses.create({ model, input: "Speak as ROMEO.", max_output_tokens: 24, temperature: 0 });
assert.ok(r.output_text && r.id.startsWith("resp_"));
const rs = client.responses.stream({ model, input: "Speak as ROMEO.", max_output_tokens: 24, temperature: 0 });
let rdeltas = "";
rs.on("response.output_text.delta", (e) => { rdeltas += e.delta; });
const rfinal = await rs.finalResponse();
assert.equal(rdeltas, r.output_text);
assert.equal(rfinal.output_text, r.output_text);
const rtools = [{ type: "function", name: "get_weather", parameters: tools[0].function.parameters }];
const rc = await client.responses.create({ model, input: "What is the weather in Mantua?", tools: rtools, temperature: 0,
  max_output_tokens: 60, tool_choice: { type: "function", name: "get_weather" } });
const call = rc.output.find((o) => o.type === "function_call");
assert.ok(call && call.name === "get_weather" && JSON.parse(call.arguments).city === "Mantua", JSON.stringify(rc.output));
const rp = await client.responses.parse({ model, input: "Who speaks?", temperature: 0, max_output_tokens: 60,
  text: { format: zodTextFormat(Line, "line") } });
assert.ok(Line.safeParse(rp.output_parsed).success, JSON.stringify(rp.output));

// errors are the SDK's typed errors
await assert.rejects(client.chat.completions.create({ model: "no-such-model", messages: ask }), (e) => e instanceof OpenAI.NotFoundError);
await assert.rejects(client.chat.completions.create({ model, messages: ask, tools, tool_choice: { type: "function", function: { name: "nope" } } }),
  (e) => e instanceof OpenAI.BadRequestError);
console.log("all openai node checks passed");

// Anthropic: the stream helper's text events and final message, whole, tool use round trip
const anthropic = new Anthropic({ baseURL: base, apiKey: "not-needed" });
const ms = anthropic.messages.stream({ model: "any-model", max_tokens: 24, temperature: 0, messages: ask });
let atext = "";
ms.on("text", (t) => { atext += t; });
const afinal = await ms.finalMessage();
assert.ok(atext && ["end_turn", "max_tokens"].includes(afinal.stop_reason));
assert.equal(afinal.content[0].text, atext);
const aw = await anthropic.messages.create({ model: "any-model", max_tokens: 24, temperature: 0, messages: ask });
assert.equal(aw.content[0].text, atext);
const atools = [{ name: "get_weather", description: "Current weather in a city", input_schema: tools[0].function.parameters }];
const amsgs = [{ role: "user", content: "What is the weather in Mantua?" }];
const au = await anthropic.messages.create({ model: "any-model", max_tokens: 60, temperature: 0, messages: amsgs, tools: atools });
assert.equal(au.stop_reason, "tool_use");
const use = au.content.find((b) => b.type === "tool_use");
assert.equal(use.input.city, "Mantua");
amsgs.push({ role: "assistant", content: au.content },
  { role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: '{"city": "Mantua", "weather": "foggy", "temperature": 9}' }] });
const aa = await anthropic.messages.create({ model: "any-model", max_tokens: 40, temperature: 0, messages: amsgs, tools: atools });
const said = aa.content.filter((b) => b.type === "text").map((b) => b.text).join("");
assert.ok(said.includes("Mantua") && said.includes("foggy"), said);
await assert.rejects(anthropic.messages.create({ model: "any-model", max_tokens: 10, messages: amsgs, tools: atools,
  tool_choice: { type: "tool", name: "nope" } }), (e) => e instanceof Anthropic.BadRequestError);
console.log("all anthropic node checks passed");
