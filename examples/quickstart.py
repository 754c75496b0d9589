"""Quickstart: MeZO in a plain torch loop, forward passes only.

SmolLM2-135M-Instruct (embedded, offline) classifies tweets by which label word it finds more
likely after "Tweet: ...\\nSentiment:". We train the last decoder layer with MeZO: every step
runs the model twice (θ+εz, θ−εz) and updates in place; no gradients, no optimizer state.

    python examples/quickstart.py              # ~3-6 min on 2 CPU cores
    python examples/quickstart.py --steps 5 --model path/to/hf_model   # any local causal LM
"""

import argparse

import torch
import torch.nn.functional as F

import zoengine
from zoengine.run import load_model
from zoengine.tasks import OptionScorer, class_metrics, encode_prompts, load_task


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-size", type=int, default=64)
    args = ap.parse_args(argv)

    model, tok = load_model(args.model)            # (model, tokenizer), in eval mode
    task = load_task(args.task, seed=0)            # fixed train/dev/test splits
    scorer = OptionScorer(tok, task.options)       # option log-likelihoods -> (n, K) scores

    def encode(rows):
        return encode_prompts(tok, [task.prompt(t) for t in rows["text"]], 128)

    dev = task.splits["dev"].shuffle(seed=0)[:args.eval_size]
    dev_seqs = encode(dev)

    def evaluate():
        return class_metrics(scorer.score_all(model, dev_seqs, 16), dev["label"])

    print("before:", evaluate())
    model.requires_grad_(False)                    # frozen tensors are never perturbed
    model.get_decoder().layers[-1].requires_grad_(True)
    opt = zoengine.MeZO(model.named_parameters(), lr=1e-5, eps=1e-3, seed=0)
    train = task.splits["train"].shuffle(seed=0)
    for step in range(args.steps):
        rows = train[step * 16:(step + 1) * 16]
        seqs, y = encode(rows), torch.tensor(rows["label"])
        loss = opt.step(lambda seqs=seqs, y=y: F.cross_entropy(scorer.scores(model, seqs), y))
        print(f"step {step + 1}/{args.steps}  loss {float(loss):.4f}", flush=True)
    after = evaluate()
    print("after:", after)
    return after


if __name__ == "__main__":
    main()
