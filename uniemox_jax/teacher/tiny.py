"""A tiny, randomly initialized CLIP teacher written to a local directory.

It has the layout of a real one (Flax weights, config, CLIP BPE tokenizer files), so the
demo and the tests exercise the same loading code as `openai/clip-vit-base-patch16`, with no
download. Its tokenizer is byte-level with a few BPE merges learnt from the prompt templates.
"""
from __future__ import annotations

import collections
import json
import os
from typing import List, Tuple


_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"

# Words the prompts use, to learn the tiny tokenizer's merges from.
_CORPUS = ("the scene type of this photo is the main subjects are the image has a brightness of "
           "and color saturation of human facial expression is the action being performed is "
           "the overall emotion conveyed is amusement awe contentment excitement anger disgust "
           "fear sadness person")


def _learn_merges(corpus: str, num_merges: int) -> List[Tuple[str, str]]:
  words = collections.Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in corpus.split())
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = max(sorted(pairs), key=lambda p: pairs[p])
    merges.append(best)
    merged = collections.Counter()
    for word, count in words.items():
      out, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] += count
    words = merged
  return merges


def write_tokenizer(directory: str, num_merges: int = 64) -> int:
  """Writes vocab.json / merges.txt of a tiny CLIP tokenizer; returns its vocabulary size."""
  # GPT-2/CLIP's reversible map from bytes to printable characters: the base vocabulary.
  from transformers.models.clip.tokenization_clip import bytes_to_unicode  # pylint: disable=g-import-not-at-top
  base = list(bytes_to_unicode().values())
  merges = _learn_merges(_CORPUS, num_merges)
  tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [_BOS, _EOS]
  vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return len(vocab)


def make_tiny_clip(directory: str, *, embed_dim: int = 64, width: int = 32, layers: int = 2,
                   heads: int = 2, image_size: int = 32, patch: int = 8, seed: int = 0) -> str:
  """Creates a random tiny CLIP (Flax weights + tokenizer) in `directory`; returns it.

  The result loads with `ClipTeacher.load(directory)` exactly like a hub checkpoint.
  """
  from transformers import CLIPConfig, CLIPTokenizer, FlaxCLIPModel  # pylint: disable=g-import-not-at-top
  vocab_size = write_tokenizer(directory)
  tokenizer = CLIPTokenizer(os.path.join(directory, "vocab.json"),
                            os.path.join(directory, "merges.txt"))
  tokenizer.save_pretrained(directory)
  eos = tokenizer.convert_tokens_to_ids(_EOS)
  config = CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       max_position_embeddings=77, bos_token_id=eos - 1, eos_token_id=eos,
                       pad_token_id=eos),
      vision_config=dict(hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         image_size=image_size, patch_size=patch),
      projection_dim=embed_dim)
  # Initialized under one jit: eagerly, each of the ~300 initializer ops compiles on its own
  # (15 s on a CPU, in every test that starts a run).
  import jax  # pylint: disable=g-import-not-at-top
  model = FlaxCLIPModel(config, _do_init=False)
  shape = ((1, 1), (1, image_size, image_size, 3))
  params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(seed), shape)
  model.save_pretrained(directory, params=params)
  return directory
