"""Find a topic's feature by contrast search, then steer generation with it (through the SDK).

Run against a running service (``make serve``)::

    .venv/bin/python scripts/demo_contrast_steer.py --target localhost:9000

It contrasts prompts about one topic with prompts about others, prints the top features with
their statistics and the tokens they promote, then clamps the best one while generating from
neutral prompts, printing the baseline (same seed, no intervention) and the steered text side
by side. ``--json FILE`` also writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saescope.client import Client, clamp

TOPICS: dict[str, list[str]] = {
    "ocean": [
        "The waves crashed against the rocky shore as the tide came in.",
        "Sailors crossed the Atlantic Ocean in a small wooden boat.",
        "Dolphins and whales swim in the deep blue sea.",
        "We walked along the beach and collected sea shells in the sand.",
        "The ship's captain watched the storm build over the open water.",
        "Coral reefs are home to thousands of species of fish.",
        "The fishermen pulled their nets from the cold northern sea.",
        "Salt water sprayed over the deck as the boat rolled in the swell.",
        "Le bateau a quitté le port et a pris la mer au lever du soleil.",
        "Die Wellen des Meeres schlugen gegen die Küste.",
        "The lighthouse guided ships safely into the harbour at night.",
        "Surfers paddled out to catch the big waves off the coast.",
        "The tide pools at low tide were full of crabs and starfish.",
        "A sea breeze carried the smell of salt across the harbour.",
        "The submarine dived beneath the surface of the Pacific Ocean.",
        "Seagulls circled above the fishing boats returning to port.",
        "The sailors raised the anchor and set sail for the islands.",
        "Whales migrate thousands of miles across the ocean each year.",
        "El barco navegaba por el mar tranquilo bajo la luna.",
        "Il mare era calmo e le onde accarezzavano la spiaggia.",
    ],
    "other": [
        "The committee approved the new budget for the city schools.",
        "She baked a chocolate cake for her brother's birthday.",
        "The train to Berlin leaves from platform four at noon.",
        "He fixed the bug in the parser and pushed the commit.",
        "The orchestra played Beethoven's fifth symphony last night.",
        "Our team won the football match in the final minute.",
        "The farmer planted wheat and corn in the spring.",
        "The museum opened a new exhibition of modern paintings.",
        "Le gouvernement a présenté une nouvelle loi sur les impôts.",
        "Der Zug nach München hatte heute zwanzig Minuten Verspätung.",
        "The students studied for their chemistry exam in the library.",
        "The desert was hot and dry, with sand dunes stretching for miles.",
        "The bank raised its interest rates for the third time this year.",
        "My grandmother knits warm sweaters every winter.",
        "The new smartphone has a faster processor and a better camera.",
        "The hikers climbed the mountain trail through the pine forest.",
        "The lawyer presented the evidence to the jury on Monday.",
        "The kids played chess in the park after school.",
        "El médico recomendó descansar y beber mucha agua.",
        "La riunione del consiglio è stata rinviata a giovedì.",
    ],
}

NEUTRAL = [
    "My favourite place in the world is",
    "Yesterday I went out and",
    "The best thing about my job is",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:9000")
    parser.add_argument("--topic", default="ocean", choices=[t for t in TOPICS if t != "other"])
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="clamp value; default: --times × the feature's max on the topic prompts",
    )
    parser.add_argument("--feature", type=int, default=None, help="steer with this hit instead")
    parser.add_argument("--times", type=float, default=1.0, help="clamp multiple of the max")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with Client(args.target, timeout=600) as client:
        info = client.info()
        print(f"model {info.model}, SAE {info.default_sae_id}\n")
        hits = client.contrast(TOPICS[args.topic], TOPICS["other"], top_n=5, locations=3)
        print(f"features more active on '{args.topic}' prompts ({hits.features_tested} tested):")
        for h in hits.positive_hits:
            print(
                f"  #{h.feature:<6} g={h.effect_size:6.2f} AUROC={h.auroc:.2f} "
                f"p_BH={h.p_value_corrected:.1e} "
                f"mean {h.mean_positive:.2f} vs {h.mean_negative:.2f}"
                f"  fires on {[loc.token for loc in h.locations]}"
            )
        # Effect sizes are standardised; among the top hits, steer with the one that moves the
        # most in absolute terms (a tiny-variance feature can top g with a small difference).
        best = max(hits.positive_hits, key=lambda h: h.mean_difference)
        if args.feature is not None:
            best = next(h for h in hits.positive_hits if h.feature == args.feature)
        card = client.feature(best.feature, top_logits=10)
        print(f"\nfeature {best.feature} promotes: {[t.token for t in card.promoted]}")
        strength = (
            args.strength
            if args.strength is not None
            else args.times * _max_on(client, best.feature, TOPICS[args.topic])
        )
        print(f"clamping feature {best.feature} to {strength:.2f} on generated tokens\n")
        runs = []
        for prompt in NEUTRAL:
            result = client.generate(
                prompt,
                interventions=[clamp(best.feature, strength, scope="generated")],
                max_new_tokens=args.max_new_tokens,
                temperature=0.0,
                baseline=True,
            )
            assert result.baseline is not None
            print(
                f"prompt:   {prompt!r}\n"
                f"baseline: {result.baseline.text!r}\n"
                f"steered:  {result.text!r}\n"
            )
            runs.append(
                {"prompt": prompt, "baseline": result.baseline.text, "steered": result.text}
            )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "model": info.model,
                        "sae": info.default_sae_id,
                        "topic": args.topic,
                        "hits": [h.to_dict() for h in hits.positive_hits],
                        "feature": best.feature,
                        "promotes": [t.token for t in card.promoted],
                        "strength": strength,
                        "generations": runs,
                    },
                    indent=2,
                )
            )


def _max_on(client: Client, feature: int, prompts: list[str]) -> float:
    acts = client.activations(prompts, features=[feature], top_k=0, top_k_aggregated=0)
    return max(max(p.values_of(feature), default=0.0) for p in acts)


if __name__ == "__main__":
    main()
