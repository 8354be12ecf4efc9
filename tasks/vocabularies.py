"""T5, mT5 and ByT5 vocabularies for tasks (defined in `prompt_tuning.data.vocabularies`).

Override the SentencePiece files with `$PROMPT_TUNING_T5_VOCAB` / `$PROMPT_TUNING_MT5_VOCAB` or
gin: `t5_vocabulary_path.path = "/data/cc_all.32000/sentencepiece.model"`. Without an override, a
run whose INITIAL_CHECKPOINT_PATH folder holds an HF `spiece.model` of the right size uses it.
"""
from prompt_tuning.data.vocabularies import (  # noqa: F401
    DEFAULT_MT5_VOCAB_PATH, DEFAULT_T5_VOCAB_PATH, MT5_VOCAB_ENV, T5_VOCAB_ENV, VOCAB_SUFFIXES,
    VOCABULARIES, byt5_vocabulary, mt5_vocabulary, mt5_vocabulary_path, output_features,
    t5_vocabulary, t5_vocabulary_path)
