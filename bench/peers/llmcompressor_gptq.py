"""Peer row: llm-compressor GPTQ W4A16 (symmetric int4) at group 64 on smollm2-135m, with the same
calibration windows and the same evaluation as bench/uniform.py. Runs in its own venv
(bench/peers/setup_llmcompressor.sh); the row lands in bench/results/peer_llmcompressor.json and is
rendered by bench/uniform.py.
"""
from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from common import RowCache  # noqa: E402

import modelpress as mp  # noqa: E402
from modelpress.eval import evaluate  # noqa: E402

LABEL = "llm-compressor gptq w4a16 g64 (peer)"


def main() -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    import llmcompressor

    base, tok = mp.load_model("smollm2-135m", device="cpu")
    windows = mp.get_windows(tok, mp.DataConfig(n_samples=128, seq_len=512))
    ds = Dataset.from_dict({"input_ids": windows.calib.tolist(), "attention_mask": torch.ones_like(windows.calib).tolist()})
    model = copy.deepcopy(base)
    recipe = GPTQModifier(
        ignore=["lm_head"], dampening_frac=0.01,
        config_groups={"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}},
    )
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=512, num_calibration_samples=128,
                shuffle_calibration_samples=False)
        model.save_pretrained(tmp, save_compressed=True)
        seconds = time.time() - t0
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors")) / 1e6
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    r = evaluate(reloaded, windows.eval, reference=base)
    row = {"label": LABEL, "ppl": r.ppl, "kl": r.kl, "size_mb": size, "seconds": seconds, "tokens": r.n_tokens,
           "version": llmcompressor.__version__}
    RowCache("peer_llmcompressor").put(LABEL, row)
    print(row)


if __name__ == "__main__":
    main()
