r"""Interprets a prompt (paper section 7): each position's nearest vocabulary tokens by cosine.

  python -m prompt_tuning.scripts.nearest_tokens --prompt PROMPT --checkpoint CKPT \
      [--model_gin models/t5_1_1_lm100k_base.gin] [--vocab SPM_MODEL | --byte_vocab] [--k 5] \
      [--png out.png]

PROMPT is any prompt file (`prompt_io.load_prompt`: .npy, extension-less numpy export, PEFT
adapter folder). The frozen model's embedding table comes from CKPT (an HF folder, our export,
or a T5X checkpoint with --model_gin) or from --embedding_npy ([vocab, d_model]). Prints one row
per prompt position: the k tokens whose embeddings have the largest cosine similarity with it,
best first; --png also draws the similarities as a heat map. The paper found class-label
initialised prompts keep their labels as nearest neighbours after training, and the other
positions cluster around semantically close words.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Callable, Sequence

import numpy as np

from prompt_tuning.formats import prompt_io


def nearest_tokens(prompt_PxD, embedding_VxD, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """`(ids_PxK, similarities_PxK)`: the k most cosine-similar embedding rows, best first."""
  prompt = np.asarray(prompt_PxD, np.float32)
  table = np.asarray(embedding_VxD, np.float32)
  if prompt.ndim != 2 or table.ndim != 2 or prompt.shape[1] != table.shape[1]:
    raise ValueError(f"The prompt {prompt.shape} and the embedding table {table.shape} must be "
                     "[P, d_model] and [vocab, d_model] with the same d_model: use the frozen "
                     "model the prompt was trained for")
  k = min(int(k), table.shape[0])
  if k <= 0:
    raise ValueError(f"k must be positive, got {k}")
  # A zero row (e.g. embedding padding) has no direction: the epsilon makes its similarity 0.
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  sims_PxV = unit(prompt) @ unit(table).T
  top = np.argpartition(-sims_PxV, k - 1, axis=1)[:, :k]
  top_sims = np.take_along_axis(sims_PxV, top, axis=1)
  order = np.argsort(-top_sims, axis=1, kind="stable")
  return np.take_along_axis(top, order, axis=1), np.take_along_axis(top_sims, order, axis=1)


# ----- token names -----

def sentencepiece_names(model_file: str | pathlib.Path,
                        extra_ids: int = 100) -> Callable[[int], str]:
  """Names ids as SentencePiece pieces; ids past the pieces are T5's sentinels, then padding."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=str(model_file))
  pieces = sp.get_piece_size()

  def name(i: int) -> str:
    if i < pieces:
      return sp.id_to_piece(i)
    if i < pieces + extra_ids:  # seqio numbers sentinels down from the top: extra_id_0 is last
      return f"<extra_id_{pieces + extra_ids - 1 - i}>"
    return f"<unused_{i}>"  # embedding rows padded to a multiple of 128
  return name


def byte_names(i: int) -> str:
  """ByT5 / seqio.ByteVocabulary: 0 pad, 1 EOS, 2 UNK, then the 256 bytes."""
  if i < 3:
    return ("<pad>", "</s>", "<unk>")[i]
  if i < 259:
    c = chr(i - 3)
    return c if c.isprintable() and c != " " else f"\\x{i - 3:02x}"
  return f"<unused_{i}>"


def id_names(i: int) -> str:
  return f"#{i}"


# ----- loading -----

def load_embedding(*, checkpoint: str | None = None, embedding_npy: str | None = None,
                   model_gin: str | None = None) -> np.ndarray:
  """The frozen model's token embedding table [vocab, d_model] as float32."""
  if (checkpoint is None) == (embedding_npy is None):
    raise ValueError("Give exactly one of --checkpoint and --embedding_npy")
  if embedding_npy is not None:
    table = np.load(embedding_npy, allow_pickle=False)
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
      raise ValueError(f"{embedding_npy}: expected a float [vocab, d_model] table, found "
                       f"{table.dtype} {table.shape}")
    return table.astype(np.float32)
  from prompt_tuning.cli import gin_utils
  from prompt_tuning.formats import pretrained
  config = gin_utils.config_from_gin(model_gin) if model_gin else None
  _, params = pretrained.load_pretrained(checkpoint, config=config)
  return np.asarray(params["token_embedder"]["embedding"], np.float32)


# ----- output -----

def format_table(ids_PxK: np.ndarray, sims_PxK: np.ndarray, name: Callable[[int], str]) -> str:
  """One line per prompt position: `token (similarity)` for each neighbour, best first."""
  cells = [[f"{name(int(i))} ({s:.3f})" for i, s in zip(row_ids, row_sims)]
           for row_ids, row_sims in zip(ids_PxK, sims_PxK)]
  widths = [max(len(r[j]) for r in cells) for j in range(ids_PxK.shape[1])]
  header = ["pos".rjust(4)] + [f"{j + 1}".ljust(w) for j, w in enumerate(widths)]
  lines = ["  ".join(header).rstrip()]
  for p, row in enumerate(cells):
    lines.append("  ".join([str(p).rjust(4)] + [c.ljust(w) for c, w in zip(row, widths)]).rstrip())
  return "\n".join(lines)


def plot_heatmap(ids_PxK: np.ndarray, sims_PxK: np.ndarray, name: Callable[[int], str],
                 path: str | pathlib.Path, title: str = "") -> pathlib.Path:
  """A PNG heat map of the similarities: rows are prompt positions, columns neighbour ranks."""
  import matplotlib
  matplotlib.use("Agg")  # no display; must precede pyplot
  import matplotlib.pyplot as plt

  num_p, k = sims_PxK.shape
  fig, ax = plt.subplots(figsize=(2.0 + 1.6 * k, 1.0 + 0.3 * num_p))
  image = ax.imshow(sims_PxK, aspect="auto", cmap="viridis", vmin=min(0.0, sims_PxK.min()),
                    vmax=1.0)
  ax.set_xticks(range(k), [str(j + 1) for j in range(k)])
  ax.set_yticks(range(num_p), [str(p) for p in range(num_p)],
                fontsize=max(4, min(9, 400 // max(num_p, 1))))
  ax.set_xlabel("neighbour rank")
  ax.set_ylabel("prompt position")
  for p in range(num_p):
    for j in range(k):
      ax.text(j, p, name(int(ids_PxK[p, j])), ha="center", va="center", fontsize=7,
              color="white" if sims_PxK[p, j] < 0.6 else "black")
  fig.colorbar(image, ax=ax, label="cosine similarity")
  ax.set_title(title or "nearest vocabulary tokens per prompt position")
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--prompt", required=True, help="prompt file or PEFT adapter folder")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", help="frozen model checkpoint (HF, T5X, orbax)")
  source.add_argument("--embedding_npy", help="embedding table [vocab, d_model] as .npy")
  parser.add_argument("--model_gin", default=None,
                      help="gin model file for checkpoints without a config (T5X)")
  names = parser.add_mutually_exclusive_group()
  names.add_argument("--vocab", help="SentencePiece model file, to print pieces")
  names.add_argument("--byte_vocab", action="store_true", help="ByT5 byte vocabulary")
  parser.add_argument("--k", type=int, default=5, help="neighbours per position")
  parser.add_argument("--png", default=None, help="also write a heat map here")
  parser.add_argument("--json", default=None, help="also write ids and similarities here")
  args = parser.parse_args(argv)
  try:
    prompt = prompt_io.load_prompt(args.prompt)
    table = load_embedding(checkpoint=args.checkpoint, embedding_npy=args.embedding_npy,
                           model_gin=args.model_gin)
    ids, sims = nearest_tokens(prompt, table, args.k)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  name = (sentencepiece_names(args.vocab) if args.vocab else
          byte_names if args.byte_vocab else id_names)
  print(f"{args.prompt}: {prompt.shape[0]} positions, d_model {prompt.shape[1]}; "
        f"vocabulary of {table.shape[0]} embeddings; cosine similarity")
  print(format_table(ids, sims, name))
  result = {"ids": ids.tolist(), "similarities": sims.tolist(),
            "tokens": [[name(int(i)) for i in row] for row in ids]}
  if args.png:
    print(f"wrote {plot_heatmap(ids, sims, name, args.png, title=pathlib.Path(args.prompt).name)}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, ensure_ascii=False))
  return result


if __name__ == "__main__":
  main()
