"""A small tokenizer for the tiny test models, built in the test session: no download, no cache.

``build_tiny_tokenizer()`` trains a byte-level BPE (as SmolLM2's is: no normaliser, no prefix
space, no BOS added) on ``TRAINING_TEXT`` below, with SmolLM2-135M-Instruct's first three
special tokens at the same ids (``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2) and
its chat template, so chats render exactly as with the default model. Any text tokenises (bytes
are the fallback); words of the training text are mostly one token each, so test sentences stay
short. Training is deterministic: the same text and settings give the same vocabulary on every
machine, in well under a second.

Before this existed the tiny models reused the cached default model's tokenizer, so on a fresh
machine every test built on them failed until some other test had fetched the 93 MB model.
"""

from __future__ import annotations

import functools
from typing import Any

VOCAB_SIZE = 2048
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# SmolLM2-135M-Instruct's chat template, as its tokenizer ships it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Varied, human-style text: English prose and chat phrases, four other languages, Python code.
TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog, and then it naps in the sun.
The cat sat on the mat, and then it slept. The dog barked at the cat.
I ate a banana for breakfast and it was ripe. She peeled a banana, then another banana.
The banana bread smelled wonderful this morning. He threw the banana peel in the bin.
Monkeys are said to love a banana more than anything. A banana is yellow; an apple is red.
The train left the station at noon. The weather is nice today, sunny and warm.
Quantum computers use qubits instead of bits. Numbers: one two three four five six seven.
Paris is the capital of France. The Eiffel Tower is in Paris. The Louvre is in Paris.
I love Paris in the spring. I love Berlin. Tokyo at night is bright. Rome has old ruins.
What is the capital of France? Where should I travel this year? My favourite city is Rome.
Once upon a time, in a land far away, there lived a king who had three daughters.
You are a helpful assistant. Hello! How are you today? Thank you very much. Hi there.
Please write a short story about the sea, the ships, the waves and the wind.
Print the numbers from one to ten. Tell me a joke about a model that reads a sentence.
The model reads a sentence and writes its residual stream into every layer, while sparse
features fire on words, numbers, code and punctuation. Sentence number seven is about food.
Good food, good wine and good friends make a good life. The soup was hot and the bread fresh.
It was a terrible day: the rain was cold, the bus was late and everything went wrong.
What a wonderful, happy, lovely day! I am so glad to see you again, my dear friend.
Die Katze schläft auf dem Sofa. Der Hund bellt. Ich liebe Berlin und das Meer.
Le chat dort. Le chien aboie. J'aime Paris et la mer. La ville est belle.
El perro come. El gato duerme en la casa. Me gusta la comida española.
Il gatto dorme sul divano. Mi piace la pizza e il mare. La città è bella.
def add(a, b):
    return a + b


class Greeter:
    def __init__(self, name: str) -> None:
        self.name = name

    def greet(self) -> str:
        return f"Hello, {self.name}!"


for i in range(10):
    if i % 2 == 0:
        print(i)
    else:
        continue
import os, sys; x = [1, 2, 3]; y = {"a": 1, "b": 2}; z = (0, 9)
"""


@functools.cache
def _tokenizer_json() -> str:
    """The trained tokenizer, serialised (trained once per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any text tokenises
        show_progress=False,
    )
    lines = TRAINING_TEXT.splitlines(keepends=True)
    bpe.train_from_iterator(lines, trainer=trainer)
    return bpe.to_str()


def build_tiny_tokenizer(*, chat_template: bool = True) -> Any:
    """A fresh ``PreTrainedTokenizerFast`` (see the module docstring); optionally no template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE if chat_template else None
    return tok
