"""Models created already partitioned over the ranks for ZeRO-3 (deepspeed.zero.Init), so that no rank ever
holds the whole model: from scratch (pretraining) or from a Hugging Face directory (full fine-tuning)."""
from __future__ import annotations

from pathlib import Path

import torch

from llm.errors import UserError
from llm.config import ModelArgs
from llm.model import Transformer
from llm.train import dist


def partitioned_transformer(args: ModelArgs, ds_config: dict, seed: int):
    """ZeRO-3: `Transformer(args)` created already partitioned over the ranks (deepspeed.zero.Init), so no rank
    ever holds the whole model (each parameter exists in full only inside its own module's __init__). In fp32 the
    weights are bit-identical to the unpartitioned `torch.manual_seed(seed); Transformer(args)` (tests/test_zero3.py):
    the modules' own inits run on full tensors before partitioning, consuming the RNG as they would; then
    `Transformer._init_weights` is replayed in `Module.apply`'s order (children first) with each module's parameters
    and its children's gathered (o_proj/down_proj are re-drawn by their parent). DeepSpeed's own `apply` wrapper
    gathers only a module's own parameters, so the parent's residual scaling would be lost; it is switched off
    (override_module_apply), which makes __init__'s apply a no-op on the empty partitions (no RNG drawn)."""
    import deepspeed

    dist.init_distributed()
    config = {**ds_config, "zero_optimization": {**ds_config.get("zero_optimization", {}),
                                                 "override_module_apply": False}}
    torch.manual_seed(seed)
    with deepspeed.zero.Init(config_dict_or_path=config):
        net = Transformer(args)

    def replay(module):
        for child in module.children():
            replay(child)
        params = {id(p): p for m in (module, *module.children()) for p in m.parameters(recurse=False)}
        if params:  # every rank draws the same values; rank 0's are kept (broadcast on exit)
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                net._init_weights(module)

    with torch.no_grad():
        replay(net)
    return net


def load_partitioned(path: str, ds_config: dict) -> Transformer:
    """The Hugging Face directory `path` as a Transformer created partitioned over the ranks (deepspeed.zero.Init,
    ZeRO-3) and filled one parameter at a time: rank 0 reads it from the safetensors file (safe_open: nothing else
    is read) into the gathered parameter, which is broadcast and re-partitioned on leaving GatheredParameters. No
    rank holds the whole model. Names and shapes are checked against config.json first, on every rank (from the
    files' headers), so an error stops all ranks before any collective. A GPTQ directory is loaded whole
    (load_model dequantizes it)."""
    import deepspeed
    from safetensors import safe_open

    from llm.hf_format import IGNORED_SUFFIXES, load_model, read_config, weight_files

    args, cfg = read_config(path)
    if cfg.get("quantization_config"):
        return load_model(path)
    rank, _, _ = dist.init_distributed()
    shapes, files = {}, {}
    for f in weight_files(Path(path)):
        if not f.is_file():
            raise UserError(f"{f}: listed in model.safetensors.index.json but missing")
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if not k.endswith(IGNORED_SUFFIXES):
                    shapes[k], files[k] = tuple(fh.get_slice(k).get_shape()), f
    zero = {**ds_config.get("zero_optimization", {}), "override_module_apply": False}  # weights come from the file
    with deepspeed.zero.Init(config_dict_or_path={**ds_config, "zero_optimization": zero}):
        model = Transformer(args)
    params = dict(model.named_parameters())  # a tied lm_head appears once, as model.embed_tokens.weight
    if args.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    wrong = [f"{k} has shape {shapes[k]} but config.json implies {tuple(p.ds_shape)}" for k, p in params.items()
             if k in shapes and shapes[k] != tuple(p.ds_shape)]
    if missing := sorted(set(params) - set(shapes)):
        wrong.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if unexpected := sorted(set(shapes) - set(params)):
        wrong.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
    if wrong:
        raise UserError(f"{path}: weights do not match config.json ({'; '.join(wrong)}); is config.json from a "
                        "different model?")
    with torch.no_grad():
        for name, p in params.items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    with safe_open(str(files[name]), framework="pt") as fh:
                        p.data.copy_(fh.get_tensor(name))
    return model.eval()
