"""The step journal: records round-trip, a torn tail is dropped, corruption is named, and a
replay without a forward pass rebuilds the weights bit for bit (every method, both CPU
backends, n-SPSA, schedulers, skipped steps, DiZO's projections)."""

import copy
import math

import pytest
import torch
from helpers import regression_batch, tiny_mlp

import zoengine
from zoengine import journal as J
from zoengine.optim.journal_file import Layout, Record

CONFIGS = {
    "mezo": lambda ps, **kw: zoengine.MeZO(ps, lr=1e-2, eps=1e-3, **kw),
    "mezo-n3-wd": lambda ps, **kw: zoengine.MeZO(ps, lr=1e-2, eps=1e-3, weight_decay=0.1,
                                                 n_samples=3, **kw),
    "kerzoo": lambda ps, **kw: zoengine.KerZOO(ps, lr=1e-2, eps=1e-3, **kw),
    "pezo-pool": lambda ps, **kw: zoengine.PeZO(ps, lr=1e-2, eps=1e-3, pool_size=97, **kw),
    "pezo-rotate": lambda ps, **kw: zoengine.PeZO(ps, lr=1e-2, eps=1e-3, reuse="rotate",
                                                  lanes=4, **kw),
    "dizo": lambda ps, **kw: zoengine.DiZO(ps, lr=1e-2, eps=1e-3, interval=3,
                                           projected=r"\.weight$", **kw),
}


def _run(make, path, steps=9, backend="reference", nan_at=(), seed=0):
    model = tiny_mlp(seed)
    start = copy.deepcopy(model)
    kw = {"backend": backend, "seed": 7}
    if nan_at:
        kw["nonfinite"] = "skip"
    opt = make(list(model.named_parameters()), **kw)
    opt.set_journal(path)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    calls = [0]

    def fresh():  # DiZO's search data: a different batch per call
        x, y = regression_batch(seed=100 + calls[0])
        calls[0] += 1
        return lambda: torch.nn.functional.mse_loss(model(x), y)

    opt.set_batch_source(lambda step, k: fresh())  # a no-op for all but DiZO
    for t in range(steps):
        x, y = regression_batch(seed=t)

        def closure(x=x, y=y, t=t):
            loss = torch.nn.functional.mse_loss(model(x), y)
            return loss * float("nan") if t in nan_at else loss
        opt.step(closure)
        sched.step()
    opt.close_journal()
    return model, start, opt


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_replay_rebuilds_the_weights_bit_for_bit(tmp_path, name, backend):
    if name in ("pezo-pool", "pezo-rotate") and backend != "reference":
        pytest.skip("reused noise runs on the reference kernels only (other backends are "
                    "refused: tests/test_bad_input.py)")
    path = tmp_path / "j.zoj"
    trained, start, opt = _run(CONFIGS[name], path, backend=backend)
    replayed = J.replay(start, path)
    for (n, a), (_, b) in zip(trained.named_parameters(), start.named_parameters()):
        assert torch.equal(a, b), n
    assert replayed.state["zo"]["step"] == opt.state["zo"]["step"] == 9
    assert type(replayed) is type(opt)


def test_replay_reproduces_skipped_steps(tmp_path):
    path = tmp_path / "j.zoj"
    trained, start, opt = _run(CONFIGS["mezo"], path, nan_at=(2, 5))
    assert opt.state["zo"]["skipped_steps"] == 2
    _, records, _ = J.read_records(path)
    assert [r.skipped for r in records].count(True) == 2
    J.replay(start, path)
    for a, b in zip(trained.parameters(), start.parameters()):
        assert torch.equal(a, b)


def test_replay_changes_nothing_without_the_records(tmp_path):
    # the check can fail: replaying half the journal leaves other weights
    path = tmp_path / "j.zoj"
    trained, start, _ = _run(CONFIGS["mezo"], path)
    J.replay(start, path, until_step=4)
    assert not all(torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))


def test_dizo_records_its_projection(tmp_path):
    path = tmp_path / "j.zoj"
    _run(CONFIGS["dizo"], path)
    header, records, _ = J.read_records(path)
    projected = [r for r in records if r.flags & 2]
    assert [r.step for r in projected] == [2, 5, 8]
    assert all(len(r.gamma) == header["projected"] == 2 for r in projected)
    assert all(len(r.values) == 2 + 2 * 10 for r in projected)  # 2 ZO + 10 iterations x 2


def test_record_roundtrip_and_sizes():
    header = {"groups": 2, "capacity": 6, "n_samples": 2, "projected": 1}
    lay = Layout(header)
    r = Record(step=41, values=[0.5, -1.25, float("inf")], hyper=[(1e-3, 1e-3, 0.0),
                                                                 (2e-3, 1e-2, 0.1)],
               grads=[3.0, -4.0], flags=1, pool_pointer=123, gamma=[0.75])
    raw = lay.pack(r)
    assert len(raw) == lay.size == 8 + 4 + 4 + 6 * 8 + 6 * 8 + 2 * 8 + 8 + 8 + 4
    back = lay.unpack(raw)
    assert back.step == 41 and back.values[:2] == [0.5, -1.25] and math.isinf(back.values[2])
    assert back.hyper == r.hyper and back.grads == r.grads and back.gamma == [0.75]
    flipped = bytearray(raw)
    flipped[20] ^= 0x10
    assert lay.unpack(bytes(flipped)) is None


def test_torn_tail_is_dropped_and_corruption_named(tmp_path):
    path = tmp_path / "j.zoj"
    _run(CONFIGS["mezo"], path, steps=5)
    size = path.stat().st_size
    header, records, _ = J.read_records(path)
    rec = Layout(header).size
    # a write cut mid-record: the partial record is dropped, never misread
    with open(path, "r+b") as f:
        f.truncate(size - rec // 2)
    _, kept, torn = J.read_records(path)
    assert [r.step for r in kept] == [0, 1, 2, 3] and torn > 0
    # the last full record damaged (its write was torn in place): dropped as well
    data = bytearray(path.read_bytes()[: size - rec])
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    _, kept, _ = J.read_records(path)
    assert [r.step for r in kept] == [0, 1, 2]
    # a damaged record in the middle is an error that names the file and the step
    data = bytearray(path.read_bytes())
    data[-rec - 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(J.JournalError, match=r"j\.zoj: record 2 \(after step 1\)"):
        J.read_records(path)
    path.write_bytes(b"not a journal")
    with pytest.raises(J.JournalError, match="not a zoengine journal"):
        J.read_records(path)


def test_reopening_appends_and_refuses_another_run(tmp_path):
    path = tmp_path / "j.zoj"
    model = tiny_mlp(0)
    opt = zoengine.MeZO(model.named_parameters(), lr=1e-2, seed=3)
    zoengine.journal.attach(opt, path)
    x, y = regression_batch()
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    opt.close_journal()
    other = zoengine.MeZO(model.named_parameters(), lr=1e-2, seed=3, n_samples=2)
    other.set_journal(path)
    with pytest.raises(J.JournalError, match="another run"):
        other.step(lambda: torch.nn.functional.mse_loss(model(x), y))


def test_replay_refuses_other_starting_weights(tmp_path):
    path = tmp_path / "j.zoj"
    _run(CONFIGS["mezo"], path, steps=2)
    with pytest.raises(J.JournalError, match="starting weights"):
        J.replay(tiny_mlp(seed=1), path)
    with pytest.raises(J.JournalError, match="do not match"):
        J.replay([("w", torch.zeros(3, requires_grad=True))], path)


def test_bad_fsync_is_named(tmp_path):
    with pytest.raises(ValueError, match="fsync"):
        J.JournalWriter(tmp_path / "j", {"groups": 1, "capacity": 2, "n_samples": 1},
                        fsync="often")


@pytest.mark.interpreter
def test_replay_on_the_triton_backend(tmp_path):
    """Triton (here under TRITON_INTERPRET=1, set by conftest without a GPU): replay re-runs
    the same kernels on the same device, so it is exact there too. Across devices the declared
    tolerance of docs/kernels.md applies (not testable without a GPU)."""
    path = tmp_path / "j.zoj"
    trained, start, _ = _run(CONFIGS["mezo"], path, steps=4, backend="triton")
    J.replay(start, path)
    for a, b in zip(trained.parameters(), start.parameters()):
        assert torch.equal(a, b)
