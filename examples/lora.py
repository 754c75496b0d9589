"""LoRA through peft, trained by MeZO: only the adapter is perturbed and updated.

Language modelling on Macbeth (bundled with zoengine). The base weights stay bit-identical;
the adapter (a few hundred kB of safetensors) is what gets saved.

    python examples/lora.py                     # ~5 min on 2 CPU cores
    python examples/lora.py --steps 3 --model path/to/hf_model
"""

import argparse

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

import zoengine
from zoengine.run import load_model
from zoengine.tasks import lm_blocks, lm_eval, lm_loss, load_task


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--output-dir", default="outputs/lora_example")
    args = ap.parse_args(argv)

    model, tok = load_model(args.model)
    task = load_task("shakespeare")
    blocks = {s: lm_blocks(tok, task.splits[s]["text"][0], args.block_size)
              for s in ("train", "dev")}
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    model.eval()                                    # no dropout: both ZO evaluations match
    model.print_trainable_parameters()
    opt = zoengine.MeZO(model.named_parameters(), lr=1e-3, eps=1e-2, seed=0)
    print("dev before:", lm_eval(model, blocks["dev"], 8, max_blocks=16))
    rng = np.random.RandomState(0)
    for step in range(args.steps):
        batch = blocks["train"][torch.as_tensor(rng.randint(0, len(blocks["train"]), 8))]
        loss = opt.step(lambda batch=batch: lm_loss(model, batch))
        print(f"step {step + 1}/{args.steps}  loss {float(loss):.4f}", flush=True)
    after = lm_eval(model, blocks["dev"], 8, max_blocks=16)
    print("dev after:", after)
    model.save_pretrained(args.output_dir)         # adapter_model.safetensors + config
    return after


if __name__ == "__main__":
    main()
