"""What the training loop can train (each a `llm.train.Task`): language modelling on token shards or chats
(lm.py), LoRA / LongLoRA adapters on top of it (lora.py), sequence classification (classify.py); models
created partitioned for ZeRO-3 (zero3.py)."""
