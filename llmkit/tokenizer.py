"""Train tokenizers with `tokenizers`' trainers, and load existing ones, as transformers' fast tokenizers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Iterator

from llmkit.errors import LlmkitError, UsageError
from llmkit.hub import from_pretrained_or_explain

# Special tokens per tokenizer family. Each family has what both objectives need: a document separator
# (eos / sep) for packing, a pad token for classification batches and a mask token for MLM.
SPECIAL_TOKENS = {
    "bpe": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "pad_token": "<|pad|>", "mask_token": "<|mask|>"},
    "wordpiece": {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "mask_token": "[MASK]"},
    "unigram": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                "mask_token": "<mask>"},
}


def train_tokenizer(batches: Iterable[list[str]], tokenizer_type: str = "bpe", vocab_size: int = 8192,
                    min_frequency: int = 2, lowercase: bool = False, model_max_length: int = 1024):
    """Train a tokenizer on batches of texts and return it as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS[tokenizer_type]
    special_list = list(dict.fromkeys(specials.values()))
    if tokenizer_type == "bpe":
        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=special_list, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif tokenizer_type == "wordpiece":
        raw = Tokenizer(models.WordPiece(unk_token=specials["unk_token"]))
        raw.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=False if not lowercase
                                                    else None)
        raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        raw.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=special_list, show_progress=False)
    elif tokenizer_type == "unigram":
        raw = Tokenizer(models.Unigram())
        raw.pre_tokenizer = pre_tokenizers.Metaspace()
        raw.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special_list,
                                          unk_token=specials["unk_token"], show_progress=False)
    else:
        raise UsageError(f"unknown tokenizer type {tokenizer_type!r}: use bpe, wordpiece or unigram")

    raw.train_from_iterator(_nonempty(batches), trainer)
    if raw.get_vocab_size() <= len(special_list):
        raise LlmkitError("the tokenizer learned no vocabulary: the training text is empty; give --data with text")
    if tokenizer_type == "wordpiece":
        cls, sep = specials["cls_token"], specials["sep_token"]
        raw.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, raw.token_to_id(cls)), (sep, raw.token_to_id(sep))])
    return PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=model_max_length, **specials)


def _nonempty(batches: Iterable[list[str]]) -> Iterator[list[str]]:
    for batch in batches:
        batch = [t for t in batch if t]
        if batch:
            yield batch


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load a fast tokenizer from a directory or Hub id, with errors that say what to do."""
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                               "vocab.txt", "tokenizer.model")):
        raise LlmkitError(f"{path} holds no tokenizer (no tokenizer.json): save the model's tokenizer into it "
                          "(tokenizer.save_pretrained), or pass --tokenizer DIR to pretrain / finetune")
    tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, name_or_path, "tokenizer",
                                           trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise LlmkitError(f"the tokenizer of {name_or_path} has no fast (Rust) version; llmkit needs one: "
                          "convert it with transformers or train one with `llmkit tokenize`")
    return tokenizer


def separator_id(tokenizer) -> int:
    """The token that ends a document in packed language-modelling data."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise LlmkitError("the tokenizer has neither an eos nor a sep token to separate documents: add one "
                      "(tokenizer.add_special_tokens) or train a tokenizer with `llmkit tokenize`")


def fingerprint(tokenizer) -> str:
    """A digest of everything that decides the token ids: the whole tokenizer.json, added tokens included."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


def untruncated(tokenizer):
    """The Rust tokenizer with saved padding/truncation switched off (some tokenizer.json files pad to 128)."""
    raw = tokenizer.backend_tokenizer
    if raw.truncation is not None or raw.padding is not None:
        from tokenizers import Tokenizer

        raw = Tokenizer.from_str(raw.to_str())
        raw.no_truncation()
        raw.no_padding()
    return raw
