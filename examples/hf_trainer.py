"""Hugging Face Trainer with zeroth-order steps: ZOTrainer + ZOTrainingArguments.

Tweet sentiment as text generation: the model reads "Tweet: ...\\nSentiment:" and the loss is
the LM loss of the answer word only (prompt tokens are masked with -100). The Trainer's loop,
LR schedule, evaluation and checkpoints are the stock ones; only training_step is ZO.

    python examples/hf_trainer.py                 # ~5 min on 2 CPU cores
    python examples/hf_trainer.py --steps 4 --model path/to/hf_model
"""

import argparse

from datasets import Dataset

from zoengine.hf import ZOTrainer, ZOTrainingArguments
from zoengine.run import load_model
from zoengine.tasks import load_task


def to_lm_dataset(task, tok, split, n):
    rows = task.splits[split].shuffle(seed=0).select(range(n))
    ids, labels = [], []
    cols = rows[:]
    for text, y in zip(cols["text"], cols["label"]):
        prompt = tok(task.prompt(text), add_special_tokens=False)["input_ids"][-96:]
        answer = tok(task.options[y], add_special_tokens=False)["input_ids"]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def collate(pad_id):
    import torch

    def fn(rows):
        n = max(len(r["input_ids"]) for r in rows)
        pad = lambda xs, v: [[v] * (n - len(x)) + x for x in xs]  # left padding
        ids = [r["input_ids"] for r in rows]
        return {"input_ids": torch.tensor(pad(ids, pad_id)),
                "attention_mask": torch.tensor(pad([[1] * len(x) for x in ids], 0)),
                "labels": torch.tensor(pad([r["labels"] for r in rows], -100))}
    return fn


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--output-dir", default="outputs/hf_trainer")
    args = ap.parse_args(argv)

    model, tok = load_model(args.model)
    task = load_task("sentiment", seed=0)
    model.requires_grad_(False)                      # ZO on the last two decoder layers
    for layer in model.get_decoder().layers[-2:]:
        layer.requires_grad_(True)
    train_args = ZOTrainingArguments(
        output_dir=args.output_dir, zo_method="mezo", learning_rate=1e-5, zo_eps=1e-3,
        max_steps=args.steps, per_device_train_batch_size=16, lr_scheduler_type="linear",
        logging_steps=5, save_strategy="steps", save_steps=max(1, args.steps // 2),
        use_cpu=True, report_to=[], seed=0, remove_unused_columns=False)
    trainer = ZOTrainer(model=model, args=train_args, data_collator=collate(tok.pad_token_id),
                        train_dataset=to_lm_dataset(task, tok, "train", 16 * args.steps),
                        eval_dataset=to_lm_dataset(task, tok, "dev", 64))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()                                  # resume: trainer.train(resume_from_checkpoint=True)
    after = trainer.evaluate()["eval_loss"]
    print(f"answer-token eval loss: {before:.4f} -> {after:.4f}")
    return before, after


if __name__ == "__main__":
    main()
