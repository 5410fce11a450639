"""Tokenize text into memmapped shards for pretraining: data/<name>/{train,val}_NNN.bin + meta.json.

    python tools/prepare_data.py                                   # builtin:demo + builtin:idioms-text -> data/pretrain
    python tools/prepare_data.py --inputs 'corpus/*.jsonl.gz' --out data/web --text_key content --dedupe true
    python tools/prepare_data.py --inputs '[zh/, en.parquet]' --out data/mix

Inputs are .txt / .jsonl / .jsonl.gz / .parquet files, globs or folders, or a `builtin:` corpus (llm/corpora.py);
the work is `llm.prepare.prepare` (N tokenizing processes, shards of bounded size, meta.json written last).
"""
from llm.cli import run_cli
from llm.prepare import prepare

if __name__ == "__main__":
    run_cli(prepare)
