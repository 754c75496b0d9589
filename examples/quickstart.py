"""Quickstart: MeZO in a plain torch loop, forward passes only.

SmolLM2-135M-Instruct (embedded, offline) classifies a tweet by which label word, " negative"
or " positive", it finds more likely after "Tweet: ...\\nSentiment:". MeZO trains the two rows
of the output layer that score those words (2 x 576 numbers, the default job's setting,
docs/default_job.md): each step evaluates the loss at θ+εz and at θ−εz and moves θ along z. No
gradients, no optimizer state. The frozen model runs once over the prompts (cached features),
so thousands of steps take seconds.

    python examples/quickstart.py              # a few minutes on 2 CPU cores, mostly the features
    python examples/quickstart.py --model path/to/hf_model   # any local causal LM

Measured 2026-12-07 on a shared 2-core CPU, seed 0, 200 held-out test tweets: accuracy
0.635 -> 0.785, AUC 0.764 -> 0.852, in about 4 minutes (model load and feature caching most of it).
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import zoengine
from zoengine.run import load_model
from zoengine.tasks import class_metrics, encode_prompts, last_features, load_task


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train-examples", type=int, default=256)  # balanced: half per class
    ap.add_argument("--test-examples", type=int, default=200)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model, tok = load_model(args.model)            # (model, tokenizer), in eval mode
    task = load_task("sentiment", seed=0)          # fixed train/dev/test splits

    def features(rows):  # the frozen model's final hidden state at the end of each prompt
        seqs = encode_prompts(tok, [task.prompt(t) for t in rows["text"]], 128)
        return last_features(model, seqs, tok.pad_token_id, 16), torch.tensor(rows["label"])

    train = task.splits["train"].shuffle(seed=0)
    labels = np.array(train["label"])
    pick = np.concatenate([np.flatnonzero(labels == c)[:args.train_examples // 2] for c in (0, 1)])
    f_train, y_train = features(train.select(pick))
    f_test, y_test = features(task.splits["test"].shuffle(seed=0).select(range(args.test_examples)))

    # the output-layer rows of the two label words: their logits are the model's own scores
    words = [tok(o, add_special_tokens=False)["input_ids"][0] for o in task.options]
    rows = torch.nn.Parameter(model.get_output_embeddings().weight.detach()[words].clone())

    def evaluate():
        m = class_metrics(f_test @ rows.detach().T, y_test.tolist())
        return {"accuracy": m["accuracy"], "auc": round(m["auc"], 4)}

    before = evaluate()
    print("before:", before)
    opt = zoengine.MeZO([("head_rows", rows)], lr=args.lr, eps=1e-3, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        b = torch.randint(len(y_train), (16,), generator=g)
        loss = opt.step(lambda b=b: F.cross_entropy(f_train[b] @ rows.T, y_train[b]))
        if (step + 1) % 1000 == 0:
            print(f"step {step + 1}/{args.steps}  loss {float(loss):.4f}", flush=True)
    after = evaluate()
    print("after: ", after)
    return before, after


if __name__ == "__main__":
    main()
