"""Pruning as a job: calibration data from a task, masks for ``zoengine train --prune``, and
``zoengine prune`` (prune a model and save it with its zeros in a dense checkpoint)."""

from __future__ import annotations

import os

import torch

from zoengine.sparsity import mask_memory, parse_prune_spec, prune, sparsity_report
from zoengine.sparsity.masks import describe_report
from zoengine.storage.fsio import probe_writable
from zoengine.storage.lock import FolderError
from zoengine.storage.modeldir import check_target, recover_model_dir, write_model_dir
from zoengine.tasks import TaskError, load_task

# 30 min of one core on Wanda-50 % SmolLM2 (docs/sparsity.md): the norms led for the first 15 min
# (38 % of the gap at 1.01x memory), full MeZO went further (46 % at 1.04x)
RECOVER_HINT = ("--train norms --keep-zeros (quick, inference memory), or --train full "
                "--keep-zeros (slower, goes further)")


CALIB_BLOCK = 128  # tokens per Wanda calibration block (Wanda's own default is 2,048 of C4)


def calib_block_size(model) -> int:
    """CALIB_BLOCK, or fewer when the model's learned positions end sooner (OPT, GPT-2 and
    BLOOM index a position table: a longer block would read past its end)."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(CALIB_BLOCK, int(limit)) if isinstance(limit, int) and limit > 0 else CALIB_BLOCK


def calibration_blocks(tok, task_name: str = "shakespeare", n_blocks: int = 16,
                       block_size: int = 128, seed: int = 0) -> torch.Tensor:
    """(n_blocks, block_size) token ids from a task's *train* split (never dev/test)."""
    task = load_task(task_name, seed=seed, block_size=block_size)
    split = task.splits["train"]
    text = (split["text"][0] if task.kind == "lm" else
            "\n".join(task.prompt(t) for t in split[: 8 * n_blocks]["text"]))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = min(n_blocks, len(ids) // block_size)
    if n == 0:
        raise ValueError(f"calibration text of {task_name!r} has only {len(ids)} tokens")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(len(ids) // block_size, generator=g)[:n] * block_size
    return torch.stack([torch.tensor(ids[s:s + block_size]) for s in starts.tolist()])


def masks_for_run(model, tok, *, prune_spec: str | None = None, sparsity: float | None = None,
                  keep_zeros: bool = False, calib_task: str = "shakespeare",
                  calib_blocks: int = 16, seed: int = 0, log=print):
    """What ``zoengine train`` passes as ``masks=``: None, ``"zeros"``, or the masks of a fresh
    ``prune`` (Wanda calibrated on ``calib_task``'s train split). Logs a one-line summary: the
    true share of zeros over the pruned tensors, per kind (attention, mlp, experts, other),
    what was not pruned (routers, embeddings, lm_head, norms and biases), and the pruner's
    notes."""
    if prune_spec is None:
        return "zeros" if keep_zeros else None
    method, pattern = parse_prune_spec(prune_spec)
    calib = None
    if method == "wanda":
        calib = list(calibration_blocks(tok, calib_task, calib_blocks, calib_block_size(model),
                                        seed=seed).split(4))
    masks = prune(model, method, sparsity, pattern, calib)
    rep, mem = sparsity_report(model, masks), mask_memory(masks)
    log(f"pruned {len(masks)} tensors ({method}, {pattern}): {describe_report(rep)}; masks "
        f"as bits {mem['bit_bytes'] / 2**20:.1f} MiB")
    for note in getattr(masks, "notes", ()):
        log(f"note: {note}")
    return masks


def run_prune(*, model_spec: str, output_dir: str, method: str, pattern: str,
              sparsity: float | None, calib_task: str, calib_blocks: int, seed: int) -> str:
    """``zoengine prune``: prune ``model_spec`` and save it (tokenizer included) as a model
    folder with its manifest, replaced as a whole (``zoengine.storage.modeldir``). An existing
    file, or a non-empty folder zoengine prune did not write, is refused before any work."""
    from zoengine.run.resources import load_model

    check_output_dir(output_dir)
    torch.manual_seed(seed)
    model, tok = load_model(model_spec)
    masks_for_run(model, tok, prune_spec=f"{method}:{pattern}", sparsity=sparsity,
                  calib_task=calib_task, calib_blocks=calib_blocks, seed=seed)

    def write(folder: str) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
    write_model_dir(output_dir, write)
    print(f"wrote {output_dir}; recover it with: zoengine train --model {output_dir} "
          f"{RECOVER_HINT}", flush=True)
    return output_dir


def check_output_dir(output_dir: str) -> None:
    """``zoengine prune --output-dir``: finish a replacement a killed prune left, refuse a file
    or someone else's folder, and check the parent folder is writable, before any work."""
    recover_model_dir(output_dir)
    check_target(output_dir)
    parent = os.path.dirname(os.path.abspath(output_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        probe_writable(parent)
    except OSError as exc:
        raise FolderError(f"cannot write {output_dir}: its folder {parent} is not writable "
                          f"({exc.strerror or exc})") from None


def run_prune_structured(*, model_spec: str, output_dir: str, structure: str,
                         sparsity: float | None, calib_task: str, calib_blocks: int,
                         seed: int) -> dict:
    """``zoengine prune --structure heads|channels``: remove whole KV groups or MLP channels by
    a Wanda-style score on ``calib_task``'s blocks and save the smaller dense model (it loads
    with plain transformers)."""
    from zoengine.run.resources import load_model
    from zoengine.sparsity.structured import prune_structured

    if sparsity is None:
        raise TaskError("--sparsity", "structured pruning needs --sparsity (the fraction of "
                                      "heads or channels removed)")
    check_output_dir(output_dir)
    torch.manual_seed(seed)
    model, tok = load_model(model_spec)
    calib = list(calibration_blocks(tok, calib_task, calib_blocks,
                                    calib_block_size(model)).split(4))
    report = prune_structured(model, structure, sparsity, calib)

    def write(folder: str) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
    write_model_dir(output_dir, write)
    print(f"removed {structure} ({report['sparsity_achieved']:.3f} of them): "
          f"{report['params_before']:,} -> {report['params_after']:,} parameters; wrote "
          f"{output_dir}; recover it with: zoengine train --model {output_dir} {RECOVER_HINT}",
          flush=True)
    return report
