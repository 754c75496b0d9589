"""DiZO through the front ends: `zoengine train --method dizo` (head, full, LoRA) and
`ZOTrainer(zo_method="dizo")`: the search gets fresh batches of its own, the training batches
are unchanged, what cannot work is refused before the first step, resume is exact."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from test_cli import tiny_args
from test_hf import lm_dataset, tiny_model, zo_args

from zoengine.cli import main
from zoengine.hf import SearchBatches, ZOTrainer
from zoengine.run.loop import LOOP_STARTED

DIZO = ["--method", "dizo", "--dizo-interval", "2", "--steps", "4", "--batch-size", "4"]


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


# ---- zoengine train ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, tensors", [("head", 1), ("full", 2 * 2), ("lora", 2 * 2 * 2)])
def test_cli_dizo_projects_in_every_mode(tiny, tmp_path, mode, tensors):
    """head: the option rows; full: k_proj/v_proj of 2 layers; LoRA: A and B of q and v."""
    out = tmp_path / mode
    assert main(tiny_args(tiny, out, "--train", mode, *DIZO)) == 0
    m = _metrics(out)
    assert m["config"]["dizo_interval"] == 2 and len(m["curve"]["loss"]) == 4
    assert m["dizo"]["searches"] == 2 and m["dizo"]["pending"] is False
    assert m["dizo"]["projected_tensors"] == tensors


def test_cli_dizo_keeps_the_training_batches(tiny, tmp_path):
    """Same seed: DiZO's first two steps equal MeZO's (the search draws from its own stream),
    and the projection after step 2 changes the trained weights."""
    from safetensors.torch import load_file

    base = [a for a in DIZO if a not in ("--dizo-interval", "2")]
    runs = {}
    for name, extra in (("mezo", ["--method", "mezo"]), ("dizo", ["--dizo-interval", "2"])):
        out = tmp_path / name
        assert main(tiny_args(tiny, out, "--train", "head", *base, *extra)) == 0
        runs[name] = (_metrics(out)["curve"]["loss"], load_file(out / "head.safetensors"))
    assert runs["mezo"][0][:2] == runs["dizo"][0][:2]
    assert not torch.equal(runs["mezo"][1]["head_rows"], runs["dizo"][1]["head_rows"])


@pytest.mark.parametrize("extra, flag", [
    (["--method", "dizo", "--dizo-interval", "0"], "--dizo-interval"),
    (["--method", "mezo", "--dizo-interval", "5"], "--dizo-interval"),
])
def test_cli_dizo_bad_flags_exit_2(tiny, tmp_path, capsys, extra, flag):
    assert main(tiny_args(tiny, tmp_path / "out", "--steps", "2", *extra)) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_cli_dizo_full_without_known_attention_names_is_refused_before_training(tiny, tmp_path,
                                                                                capsys):
    """An MPT (attn.Wqkv: no entry of the architecture table) with --train full: exit 2 before
    any step, naming --dizo-projected; with it, the run trains."""
    from transformers import AutoTokenizer, MptConfig, MptForCausalLM

    folder = tmp_path / "mpt"
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    MptForCausalLM(MptConfig(vocab_size=len(tok), d_model=16, n_layers=1, n_heads=2,
                             max_seq_len=256)).save_pretrained(folder)
    tok.save_pretrained(folder)
    args = tiny_args(tiny, tmp_path / "out", "--train", "full", *DIZO)
    args[args.index("--model") + 1] = str(folder)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "--dizo-projected" in captured.err and "Wqkv" in captured.err
    assert LOOP_STARTED not in captured.out
    args[args.index("--output-dir") + 1] = str(tmp_path / "out2")
    assert main(args + ["--dizo-projected", r"attn\.Wqkv\.weight$"]) == 0
    assert main(tiny_args(tiny, tmp_path / "o3", "--dizo-projected", "all")) == 2  # not dizo


# ---- ZOTrainer ---------------------------------------------------------------------------------

class Recording(ZOTrainer):
    """Records the training batches (the only override in these tests)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(inputs["input_ids"].clone())
        return super().training_step(model, inputs, num_items_in_batch)


def _trainer(out, model, cls=ZOTrainer, method="dizo", **kw):
    if method == "dizo":
        kw.setdefault("zo_kwargs", {"interval": 2, "search_iters": 2})
    tr = cls(model=model, args=zo_args(out, zo_method=method, max_steps=4, **kw),
             train_dataset=lm_dataset())
    tr.seen = []
    return tr


def _zo(tr):
    return tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer


def test_trainer_dizo_wires_its_search_and_keeps_the_training_batches(tmp_path):
    dizo = _trainer(tmp_path / "d", tiny_model(), Recording)
    dizo.train()
    opt = _zo(dizo)
    assert isinstance(opt.batch_source, SearchBatches) and opt.projection_closure is None
    assert opt.projection_summary()["searches"] == 2
    mezo = _trainer(tmp_path / "m", tiny_model(), Recording, method="mezo")
    mezo.train()
    assert _zo(mezo).batch_source is None  # the hook was called: a no-op for MeZO
    assert len(dizo.seen) == len(mezo.seen) == 4
    assert all(torch.equal(a, b) for a, b in zip(dizo.seen, mezo.seen))


def test_trainer_dizo_resume_reproduces_uninterrupted_run(tmp_path):
    full = tiny_model()
    _trainer(tmp_path / "a", full).train()
    _trainer(tmp_path / "b", tiny_model(), save_strategy="steps", save_steps=3).train()
    resumed = tiny_model(seed=123)
    tr = _trainer(tmp_path / "b", resumed)
    tr.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert _zo(tr).projection_summary()["searches"] == 2  # one restored, one after resume
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


# ---- the declared hook: one contract, one seeding, every front end ------------------------------

class _Spy:
    """Records the (seed, step, k) of every search batch drawn through
    ``zoengine.optim.batches.search_rng`` (the one seeding scheme)."""

    def __init__(self, monkeypatch):
        from zoengine import hf
        from zoengine.run import loop

        self.calls, real = [], hf.search_rng

        def spy(seed, step, k):
            self.calls.append((seed, step, k))
            return real(seed, step, k)
        monkeypatch.setattr(hf, "search_rng", spy)  # ZOTrainer's SearchBatches
        monkeypatch.setattr(loop, "search_rng", spy)  # the CLI loop


def _expected(seed, steps, interval, iters):
    return [(seed, t, k) for t in range(interval, steps + 1, interval) for k in range(iters)]


def test_cli_and_trainer_draw_search_batches_by_one_scheme(tiny, tmp_path, monkeypatch):
    """The CLI loop and ZOTrainer hand DiZO search batch k after t steps from
    search_rng(seed, t, k); the loop's batch is the strategy's batch on exactly that state."""
    spy = _Spy(monkeypatch)
    assert main(tiny_args(tiny, tmp_path / "cli", "--train", "head", "--seed", "5",
                          *DIZO)) == 0
    assert spy.calls == _expected(5, 4, 2, 10)  # DiZO's default search_iters: 10
    spy.calls.clear()
    tr = _trainer(tmp_path / "hf", tiny_model(), zo_seed=5)
    tr.train()
    assert spy.calls == _expected(5, 4, 2, 2)
    assert _zo(tr).projection_summary()["searches"] == 2


def test_loop_and_trainer_sources_use_the_rng_state_of_the_scheme(tmp_path):
    from zoengine.optim.batches import search_rng
    from zoengine.run.loop import search_batches

    class Strategy:
        def batch_closure(self, rng):
            self.state = rng.get_state()[1].tolist()
            return lambda: torch.tensor(0.0)

    s = Strategy()
    closure = search_batches(s, 11)(6, 3)
    assert callable(closure) and s.state == search_rng(11, 6, 3).get_state()[1].tolist()
    # the Trainer: rows of search batch k are search_rng's draws after the collator's seed
    tr = _trainer(tmp_path, tiny_model())
    rows = []
    sb = SearchBatches(tr, None)
    ds, collate, _ = sb.data

    class Rows:  # the dataset, recording the rows read
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            rows.append(i)
            return ds[i]

    sb.__dict__["data"] = (Rows(), collate, True)
    sb.batch(11, 6, 3)
    rng = search_rng(11, 6, 3)
    rng.randint(0, 1 << 62, dtype="int64")
    assert rows == rng.choice(len(ds), size=4, replace=False).tolist()


def test_replay_feeds_the_search_through_the_hook(tmp_path, monkeypatch):
    """Journal replay hands DiZO its recorded values through set_batch_source, at the same
    (step, k) as the run, and puts the optimizer's own source back afterwards."""
    from zoengine import journal as J
    from zoengine.optim import DiZO

    asked = {"run": [], "replay": []}
    real = DiZO._next_closure

    def spy(self, m):
        asked[self._phase].append((self.state["zo"]["step"], m))
        return real(self, m)
    monkeypatch.setattr(DiZO, "_next_closure", spy)
    model = tiny_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    opt = DiZO(model.named_parameters(), lr=1e-3, interval=2, search_iters=2,
               projection_closure=lambda: loss)
    opt._phase = "run"
    opt.set_journal(tmp_path / "j.zoj")
    for _ in range(4):
        opt.step(loss)
    opt.close_journal()
    fresh = tiny_model(seed=7)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.copy_(start[n])
    other = DiZO(fresh.named_parameters(), lr=1e-3, interval=2, search_iters=2,
                 projection_closure=lambda: loss)  # the user's own source ...
    own = other.batch_source
    other._phase = "replay"
    J.replay(fresh, tmp_path / "j.zoj", optimizer=other)
    assert asked["replay"] == asked["run"] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    assert other.batch_source is own  # ... is back after the replay
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


def test_the_hook_is_a_noop_for_mezo():
    from zoengine import MeZO

    def run(with_source):
        model = tiny_model()
        opt = MeZO(model.named_parameters(), lr=1e-3, seed=2)
        called = []
        if with_source:
            assert opt.set_batch_source(lambda step, k: called.append(1)) is None
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        assert not called and opt.batch_source is None
        return model

    a, b = run(True), run(False)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(TypeError, match="set_batch_source"):
        MeZO(tiny_model().parameters()).set_batch_source("not callable")


def test_a_users_source_wins_over_a_front_ends():
    from zoengine.optim import DiZO

    mine = lambda: (lambda: torch.tensor(1.0))  # noqa: E731
    opt = DiZO(tiny_model().named_parameters(), interval=1, projection_closure=mine)
    front = lambda step, k: (lambda: torch.tensor(2.0))  # noqa: E731
    kept = opt.set_batch_source(front, replace=False)
    assert opt.projection_closure is mine and kept is opt.batch_source
    bare = DiZO(tiny_model().named_parameters(), interval=1)
    assert bare.set_batch_source(front, replace=False) is None and bare.batch_source is front
    with pytest.raises(TypeError, match=r"source\(step, k\) must return a loss closure"):
        bare.set_batch_source(lambda step, k: 3.0)
        bare.step(lambda: torch.tensor(0.5))


def test_trainer_keeps_a_projection_closure_from_zo_kwargs(tmp_path):
    calls = []

    def mine():
        calls.append(1)
        model = tr.model
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        return lambda: model(input_ids=ids, labels=ids).loss

    tr = _trainer(tmp_path, tiny_model(),
                  zo_kwargs={"interval": 2, "search_iters": 2, "projection_closure": mine})
    tr.train()
    assert len(calls) == 2 * 2 and _zo(tr).projection_closure is mine


# ---- the library uses no deprecated spelling ----------------------------------------------------

def test_the_library_emits_no_deprecation_warning(tiny, tmp_path):
    """A CLI run (DiZO, journal, --perturbation virtual), its apply-journal, and ZOTrainer
    runs (DiZO; virtual) with every DeprecationWarning recorded: none comes from zoengine."""
    import os

    import zoengine

    root = os.path.dirname(zoengine.__file__)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(tiny_args(tiny, tmp_path / "a", "--train", "head", *DIZO)) == 0
        assert main(tiny_args(tiny, tmp_path / "b", "--train", "full", "--perturbation",
                              "virtual", "--steps", "2")) == 0
        assert main(["apply-journal", tiny["model"], str(tmp_path / "a" / "journal.zoj"),
                     str(tmp_path / "c")]) == 0
        _trainer(tmp_path / "d", tiny_model()).train()
        _trainer(tmp_path / "e", tiny_model(), method="mezo", zo_perturbation="virtual").train()
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in seen
            if issubclass(w.category, DeprecationWarning) and w.filename.startswith(root)]
    assert not ours, ours
