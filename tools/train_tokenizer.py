"""Train a sentencepiece BPE tokenizer for Chinese and English text: tokenizer.model + the Hugging Face files.

    python tools/train_tokenizer.py                                  # builtin:demo -> data/tokenizer/tokenizer.model
    python tools/train_tokenizer.py --inputs corpus/ --vocab_size 32000 --preset 125M

The work is `llm.tokenizer_train.train_tokenizer` (BPE with byte fallback, digits split, the ChatML roles as single
tokens, a reservoir sample of the input); it ends with a report of characters and bytes per token on held-out
Chinese and English text.
"""
from llm.cli import run_cli
from llm.tokenizer_train import HF_FILES, train_tokenizer  # noqa: F401 - HF_FILES: read by tests through runpy

if __name__ == "__main__":
    run_cli(train_tokenizer)
