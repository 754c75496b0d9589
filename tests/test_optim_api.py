"""The torch.optim-shaped constructor (issue 30, part 4): hyper-parameters on the constructor,
engine features attached afterwards, the old keywords still working for one release with a
DeprecationWarning (and bit-identical results), the registry, the journal header's method
record (old headers still replay), shared docstrings, ``zoengine.journal`` after ``import
zoengine``, and the library itself free of deprecated spellings."""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
import warnings
import zlib

import pytest
import torch
from helpers import regression_batch, tiny_mlp

import zoengine
from zoengine import journal as J
from zoengine.optim import DiZO, registry
from zoengine.optim.journal_file import MAGIC, read_header


def _loss(model, t):
    x, y = regression_batch(seed=t)
    return lambda: torch.nn.functional.mse_loss(model(x), y)


def _train(make, *, steps=4, attach=lambda opt, model: None, seed=0):
    """(model, optimizer) after ``steps`` steps of ``make(named_params, model)``."""
    model = tiny_mlp(seed)
    opt = make(list(model.named_parameters()), model)
    attach(opt, model)
    for t in range(steps):
        opt.step(_loss(model, t))
    opt.close_journal()
    return model, opt


def _same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---- the deprecated engine keywords ------------------------------------------------------------

OLD_NEW = {  # old keywords -> the new spelling, as (constructor kwargs, attach(opt, model, path))
    "journal": (lambda m, path: {"journal": path},
                lambda opt, m, path: opt.set_journal(path)),
    "journal_fsync": (lambda m, path: {"journal": path, "journal_fsync": 2},
                      lambda opt, m, path: opt.set_journal(path, fsync=2)),
    "perturbation+model": (lambda m, path: {"perturbation": "virtual", "model": m},
                           lambda opt, m, path: opt.attach_virtual(m)),
}


@pytest.mark.parametrize("old", sorted(OLD_NEW))
@pytest.mark.parametrize("cls", [zoengine.MeZO, zoengine.KerZOO, zoengine.PeZO, zoengine.ZO])
def test_old_keywords_warn_and_behave_exactly_as_the_new_spelling(tmp_path, cls, old):
    kwargs_of, attach = OLD_NEW[old]
    hyper = dict(lr=1e-2, eps=1e-3, seed=3, backend="reference")
    if cls is zoengine.PeZO:
        hyper["pool_size"] = 97
    paths = {"old": tmp_path / "old.zoj", "new": tmp_path / "new.zoj"}

    def make_old(named, model):
        with pytest.warns(DeprecationWarning) as rec:
            opt = cls(named, **hyper, **kwargs_of(model, paths["old"]))
        names = [k for k in kwargs_of(model, paths["old"])]
        messages = [str(w.message) for w in rec if w.category is DeprecationWarning]
        for k in names:  # one warning per old keyword, naming its replacement
            assert any(f"{k}=" in m and "opt." in m for m in messages), (k, messages)
        assert all(w.filename == __file__ for w in rec)  # attributed to the caller's line
        return opt

    def make_new(named, model):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            return cls(named, **hyper)

    a, opt_a = _train(make_old)
    b, opt_b = _train(make_new, attach=lambda opt, m: attach(opt, m, paths["new"]))
    assert _same_weights(a, b)
    assert opt_a.perturbation == opt_b.perturbation
    if "journal" in old:
        assert paths["old"].read_bytes() == paths["new"].read_bytes()


def test_old_distributed_keyword_on_a_one_rank_group(tmp_path):
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        def old(named, model):
            with pytest.warns(DeprecationWarning, match=r"distributed=.*set_distributed"), \
                    pytest.warns(DeprecationWarning, match=r"journal=.*set_journal"):
                return zoengine.MeZO(named, lr=1e-2, seed=1, distributed=True,
                                     journal=tmp_path / "a.zoj")

        def new(named, model):
            return zoengine.MeZO(named, lr=1e-2, seed=1)

        def attach(opt, model):
            opt.set_distributed(True)
            opt.set_journal(tmp_path / "b.zoj")

        a, opt_a = _train(old)
        b, opt_b = _train(new, attach=attach)
        assert opt_a.distributed == opt_b.distributed == "losses"
        assert _same_weights(a, b)
        assert (tmp_path / "a.zoj").read_bytes() == (tmp_path / "b.zoj").read_bytes()
        with pytest.raises(ValueError, match="DiZO's projection search is not reduced"):
            DiZO(tiny_mlp().named_parameters(), projected="all").set_distributed(True)
    finally:
        dist.destroy_process_group()


def test_dizo_old_keywords_and_errors_unchanged(tmp_path):
    model = tiny_mlp()
    with pytest.warns(DeprecationWarning, match="perturbation="), \
            pytest.warns(DeprecationWarning, match="model="):
        opt = DiZO(model.named_parameters(), projected="all", perturbation="virtual",
                   model=model)
    assert opt.perturbation == "virtual"
    with pytest.raises(ValueError, match="virtual perturbation needs a model"), \
            pytest.warns(DeprecationWarning):
        zoengine.MeZO(model.parameters(), perturbation="virtual")
    with pytest.raises(ValueError, match="model= is only used"), \
            pytest.warns(DeprecationWarning):
        zoengine.MeZO(model.parameters(), model=model)
    with pytest.raises(ValueError, match="perturbation='sideways'"), \
            pytest.warns(DeprecationWarning):
        zoengine.MeZO(model.parameters(), perturbation="sideways")
    with pytest.raises(ValueError, match="model=dict"), pytest.warns(DeprecationWarning):
        zoengine.MeZO(model.parameters(), perturbation="virtual", model={})
    with pytest.raises(TypeError, match="unexpected keyword argument 'jurnal'"):
        zoengine.MeZO(model.parameters(), jurnal="x")
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        zoengine.KerZOO(model.parameters(), bogus=1)


def test_attach_virtual_module_function_and_its_refusals(tmp_path):
    from zoengine.optim import virtual

    model = tiny_mlp()
    opt = zoengine.MeZO(model.named_parameters(), lr=1e-2)
    hooks = virtual.attach(opt, model)
    assert opt.perturbation == "virtual" and opt.inplace_fallback == []
    with pytest.raises(ValueError, match="attached already"):
        opt.attach_virtual(model)
    hooks.remove()
    late = zoengine.MeZO(model.named_parameters(), lr=1e-2)
    late.set_journal(tmp_path / "j.zoj")
    late.step(_loss(model, 0))
    with pytest.raises(ValueError, match="journal is already open"):
        late.attach_virtual(model)
    late.close_journal()


# ---- hyper-parameters and the registry ---------------------------------------------------------

@pytest.mark.parametrize("name", registry.available_methods())
def test_hyperparameters_rebuild_every_registered_method(name):
    named = list(tiny_mlp().named_parameters())
    kw = {"projected": "all"} if name == "dizo" else {}
    opt = registry.create(name, named, lr=0.5, eps=0.25, seed=9, n_samples=2, **kw)
    hyper = opt.hyperparameters()
    json.dumps(hyper)  # plain values
    canonical = registry.method_name(type(opt))
    again = registry.create(canonical, list(tiny_mlp().named_parameters()), **hyper)
    assert type(again) is type(opt)
    assert again.hyperparameters() == hyper and again._run_config() == opt._run_config()
    assert (hyper["lr"], hyper["eps"], hyper["seed"], hyper["n_samples"]) == (0.5, 0.25, 9, 2)


def test_register_method_refuses_a_duplicate_name(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    with pytest.raises(ValueError, match=r"'mezo' is registered already.*replace=True"):
        registry.register_method("mezo", zoengine.ZO)
    assert registry.method_spec("mezo").cls is zoengine.MeZO
    registry.register_method("mezo", zoengine.ZO, replace=True, noise="uniform")
    assert registry.method_spec("mezo").cls is zoengine.ZO
    with pytest.raises(ValueError, match="non-empty str"):
        registry.register_method("", zoengine.ZO)


def test_unregistered_class_cannot_journal(tmp_path):
    class Mine(zoengine.ZO):
        pass

    model = tiny_mlp()
    opt = Mine(model.named_parameters(), lr=1e-2)
    opt.set_journal(tmp_path / "j.zoj")
    with pytest.raises(ValueError, match="not in zoengine's method registry"):
        opt.step(_loss(model, 0))


# ---- the journal header: method record; format-1 headers still replay --------------------------

def _rewrite_header(path, header: dict) -> None:
    """Replace the journal's header, keeping its records (what an older zoengine wrote)."""
    _, start = read_header(str(path))
    records = path.read_bytes()[start:]
    text = json.dumps(header, sort_keys=True).encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(text)) + text
                     + struct.pack("<I", zlib.crc32(text)) + records)


def test_header_records_the_method_name_and_hyperparameters(tmp_path):
    path = tmp_path / "j.zoj"
    _train(lambda named, m: zoengine.PeZO(named, lr=1e-2, reuse=None, pool_size=97),
           attach=lambda opt, m: opt.set_journal(path))
    header, _ = read_header(str(path))
    assert header["format"] == 2 and "call" not in header
    assert header["method"]["name"] == "pezo" and header["method"]["masks"] is None
    assert header["method"]["hyperparameters"]["reuse"] is None


@pytest.mark.parametrize("case", ["mezo", "dizo", "virtual"])
def test_format_1_journals_still_replay_bit_for_bit(tmp_path, case):
    path = tmp_path / "j.zoj"
    fresh = iter(range(10**6))
    if case == "dizo":
        def make(named, m):
            opt = DiZO(named, lr=1e-2, eps=1e-3, seed=7, interval=2, tau=0.3,
                       projected=r"\.weight$")
            opt.set_batch_source(lambda step, k: _loss(m, 100 + next(fresh)))
            return opt
        call = {"class": "zoengine.optim.dizo.DiZO", "args": [1e-2, 1e-3],
                "kwargs": {"seed": 7, "interval": 2, "clip": 0.3, "projected": r"\.weight$"},
                "masks": None}
    else:
        def make(named, m):
            return zoengine.MeZO(named, lr=1e-2, eps=1e-3, seed=7, backend="reference")
        kwargs = {"seed": 7, "backend": "reference"}
        if case == "virtual":
            kwargs["perturbation"] = "virtual"
        call = {"class": "zoengine.optim.mezo.MeZO", "args": [1e-2, 1e-3], "kwargs": kwargs,
                "masks": None}

    def attach(opt, m):
        if case == "virtual":
            opt.attach_virtual(m)
        opt.set_journal(path)

    start = tiny_mlp()
    more = copy.deepcopy(start)
    trained, _ = _train(make, steps=5, attach=attach)
    header, _ = read_header(str(path))
    old = {k: v for k, v in header.items() if k != "method"}
    old.update(format=1, call=call)
    if case == "dizo":
        old["config"] = {("dizo.clip" if k == "dizo.tau" else k): v
                         for k, v in old["config"].items()}
    _rewrite_header(path, old)
    opt = J.replay(start, path)
    assert _same_weights(trained, start)
    assert opt.state["zo"]["step"] == 5
    if case == "dizo":
        assert opt.tau == 0.3 and opt.state["zo"]["dizo_searches"] == 2
    if case == "virtual":
        return
    # an interrupted old run resumes: its journal is appended to, not refused
    resumed = J.replay(more, path)
    resumed.set_journal(path)
    resumed.set_batch_source(lambda step, k: _loss(more, 100 + next(fresh)))
    resumed.step(_loss(more, 5))
    resumed.close_journal()
    assert [r.step for r in J.read_records(path)[1]] == [0, 1, 2, 3, 4, 5]


def test_format_1_journal_of_an_unknown_class_is_refused_clearly(tmp_path):
    path = tmp_path / "j.zoj"
    _train(lambda named, m: zoengine.MeZO(named, lr=1e-2),
           attach=lambda opt, m: opt.set_journal(path))
    header, _ = read_header(str(path))
    old = {k: v for k, v in header.items() if k != "method"}
    old.update(format=1, call={"class": "mylab.optim.FancyZO", "args": [], "kwargs": {},
                               "masks": None})
    _rewrite_header(path, old)
    with pytest.raises(J.JournalError, match=r"j\.zoj: .*'mylab\.optim\.FancyZO'.*register"):
        J.replay(tiny_mlp(), path)


# ---- DiZO: tau and clip ------------------------------------------------------------------------

def test_dizo_clip_bounds_g_with_the_kernel_estimator_and_tau_is_its_own():
    def run(**kw):
        model = tiny_mlp()
        opt = DiZO(model.named_parameters(), lr=1e-2, eps=1e-3, estimator="kernel",
                   interval=10**6, projected="all", seed=4, **kw)
        grads = []
        for t in range(6):
            opt.step(lambda t=t: 50.0 * _loss(model, t)())  # large |g|
            grads += opt.state["zo"]["projected_grads"]
        return opt, grads, model

    free_opt, free, _ = run(tau=0.2)
    clipped_opt, clipped, _ = run(tau=0.2, clip=0.05)
    assert max(abs(g) for g in free) > 0.05
    assert max(abs(g) for g in clipped) <= 0.05
    assert clipped_opt.clip == 0.05 and clipped_opt.tau == 0.2 and free_opt.clip is None
    assert clipped_opt.hyperparameters()["clip"] == 0.05
    with pytest.warns(FutureWarning, match=r"DiZO\(clip=0\.3\) bounds \|g\|.*tau="):
        opt = DiZO(tiny_mlp().named_parameters(), projected="all", clip=0.3)
    assert opt.clip == 0.3 and opt.tau == 0.2


def test_dizo_state_dict_with_the_old_tau_key_loads():
    model = tiny_mlp()
    opt = DiZO(model.named_parameters(), projected="all", tau=0.1)
    sd = opt.state_dict()
    cfg = sd["state"]["zo"]["config"]
    sd["state"]["zo"]["config"] = {("dizo.clip" if k == "dizo.tau" else k): v
                                   for k, v in cfg.items()}
    DiZO(tiny_mlp().named_parameters(), projected="all", tau=0.1).load_state_dict(sd)
    with pytest.raises(ValueError, match="dizo.tau"):
        DiZO(tiny_mlp().named_parameters(), projected="all", tau=0.3).load_state_dict(sd)


# ---- docs and the package ----------------------------------------------------------------------

def test_shared_docstring_fragments_expand_once_written():
    from zoengine.optim.docs import ARGS

    lr = ARGS["lr"].strip()
    for cls in (zoengine.ZO, zoengine.MeZO, zoengine.KerZOO, zoengine.PeZO, DiZO):
        doc = cls.__doc__
        assert "{args" not in doc and "{engine}" not in doc, cls
        assert lr in doc and "set_journal" in doc and "attach_virtual" in doc, cls
    assert ARGS["backend"].strip().splitlines()[0] in zoengine.MeZO.__doc__


def test_journal_is_an_attribute_after_import_zoengine():
    code = ("import sys, zoengine; f = zoengine.journal.replay; "
            "assert callable(f) and zoengine.journal.attach; "
            "assert 'journal' in dir(zoengine); "
            "assert 'triton' not in sys.modules and 'cupy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
