// A tour of the Node.js client: node example.js [host:port]
// (default: SAESCOPE_TARGET or localhost:9000; SAESCOPE_API_KEY is sent when set).
'use strict';

const { SaeScopeClient, SaeScopeError, clamp, direction, when, denseToArray } = require('./index');

async function main() {
  const client = new SaeScopeClient({ target: process.argv[2] });
  try {
    const info = await client.info();
    console.log(`model: ${info.model} (${info.device}), SAEs: ${info.saes.map((s) => s.saeId).join(', ')}`);

    const prompt = 'The quick brown fox jumps over the lazy dog';
    const tok = await client.tokenize(prompt);
    console.log(`tokens: ${tok.tokens.map((t) => JSON.stringify(t.text)).join(' ')}`);

    const acts = await client.activations([prompt], { topK: 3, features: [3] });
    const first = acts.prompts[0];
    const values = denseToArray(first.featureValues);
    first.tokens.forEach((t, i) => {
      const top = first.tokenTopFeatures[i];
      const pairs = top.features.map((f, j) => `${f}=${top.values[j].toFixed(2)}`).join(' ');
      console.log(`  ${JSON.stringify(t.text)}: ${pairs} | f3=${values[i].toFixed(2)}`);
    });

    const gen = await client.generate(prompt, { interventions: [clamp(3, 6)], maxNewTokens: 8, baseline: true });
    console.log(`steered: ${JSON.stringify(gen.steered.text)}`);
    console.log(`baseline: ${JSON.stringify(gen.baseline.text)}`);

    let streamed = '';
    for await (const event of client.stream(prompt, { interventions: [clamp(3, 6)], maxNewTokens: 8 })) {
      if (event.token) streamed += event.token.text;
      if (event.done) console.log(`streamed: ${JSON.stringify(streamed)} (${event.done.steered.finishReason})`);
    }

    // Leaving the loop early cancels the call: the server stops decoding.
    for await (const event of client.stream(prompt, { maxNewTokens: 200 })) {
      if (event.token) break;
    }

    // A contrast's difference in means is a steering vector: add it, no feature involved.
    const hits = await client.contrast(['Paris in spring', 'I love Paris'], ['Tokyo at night', 'Rome is old']);
    const vector = denseToArray(hits.differenceInMeans);
    console.log(`difference in means: ${vector.length} floats, norm ${hits.differenceInMeansNorm.toFixed(3)}`);
    const pushed = await client.generate(prompt, { interventions: [direction(vector, 30)], maxNewTokens: 8 });
    console.log(`direction: ${JSON.stringify(pushed.steered.text)}`);

    // Conditional: clamp feature 3 only where feature 5 is above 0.5; `fired` says where.
    const guarded = await client.generate(prompt, {
      interventions: [when(clamp(3, 6), { feature: 5, above: 0.5 })],
      maxNewTokens: 8,
    });
    const fired = guarded.steered.fired.map((f) => f.positions.join(','));
    console.log(`conditional: ${JSON.stringify(guarded.steered.text)} fired at [${fired}]`);

    // The hits to steer with: reranked by output score (does adding one move the output?).
    const steerable = await client.contrast(['Paris in spring', 'I love Paris'], ['Tokyo at night', 'Rome is old'], {
      topN: 2,
      orderBy: 'output_score',
    });
    const scored = steerable.positiveHits.map((h) => `${h.feature} ${h.outputScore.toFixed(4)}`).join(', ');
    console.log(`by output score: ${scored}`);

    const feat = await client.feature(3, { topLogits: 3 });
    console.log(`feature 3 promotes: ${feat.promoted.map((t) => JSON.stringify(t.token)).join(' ')}`);

    // Which features make the model predict its next token (activation × gradient).
    const why = await client.attribute(prompt, { topN: 3 });
    const top = why.features.map((f) => `${f.feature} ${f.attribution.toFixed(3)}`).join(', ');
    console.log(`attribution of ${JSON.stringify(why.target.text)}: ${top}; error ${why.error.toFixed(3)}, total ${why.total.toFixed(3)}`);

    // Features for a text: by label and context (with a catalog) and by firing on the text.
    const found = await client.searchFeatures('The quick brown fox', { topN: 3 });
    console.log(`search: ${found.hits.map((h) => `${h.feature} ${h.matched}`).join(', ')}`);

    try {
      await client.activations([prompt], { saeId: 'no-such-sae' });
    } catch (err) {
      if (!(err instanceof SaeScopeError)) throw err;
      console.log(`error: ${err.code}`);
    }
    console.log('OK');
  } finally {
    client.close();
  }
}

main().catch((err) => {
  console.error(`example: ${err.message}`);
  process.exit(1);
});
