"""Train a sentencepiece BPE tokenizer for Chinese and English text: tokenizer.model + the Hugging Face files.

    python tools/train_tokenizer.py                                  # builtin:demo + builtin:idioms -> data/tokenizer/tokenizer.model
    python tools/train_tokenizer.py --inputs corpus/ --vocab_size 32000 --preset 125M
    python tools/train_tokenizer.py --inputs '[builtin:demo, builtin:idioms]' --char_share 0.85   # run.sh's: + SFT text

The work is `llm.tokenizer_train.train_tokenizer` (BPE with byte fallback, digits split, the ChatML roles as single
tokens, a reservoir sample of the input); chat built-ins (builtin:idioms, ...) are read as the text of the chats SFT
trains on. It ends with a report of characters and bytes per token on held-out Chinese and English text (and the
share of byte fragments in the chat inputs' held-out chats).
"""
from llm.cli import run_cli
from llm.tokenizer_train import HF_FILES, train_tokenizer  # noqa: F401 - HF_FILES: read by tests through runpy

if __name__ == "__main__":
    run_cli(train_tokenizer)
