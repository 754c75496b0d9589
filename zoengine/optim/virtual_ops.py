"""The ``ops`` of a virtual step: record the displacement of virtualised tensors (the hooks of
``optim/virtual.py`` apply it inside the forward), hand the rest to the backend in place."""

from __future__ import annotations

from zoengine.optim.masks import LazyMask


class VirtualOps:
    """``ops`` for ``functional.zo_step``: virtualised tensors get their displacement recorded
    (the hooks apply it), the rest go to the ``inner`` backend's in-place ops."""

    def __init__(self, inner, virtual):
        self.inner, self.virtual = inner, virtual
        virtual.displaced.clear()  # a new step: nothing is displaced, nothing read yet
        virtual.consumed.clear()

    def _split(self, params, keys, masks, offsets):
        """(virtual, in-place) lists of (tensor, key, mask getter, offset)."""
        mine, rest = [], []
        for i, (p, k) in enumerate(zip(params, keys)):
            o = 0 if offsets is None else offsets[i]
            (mine if id(p) in self.virtual.owned else rest).append((p, k, _mask_getter(masks, i), o))
        return mine, rest

    @staticmethod
    def _lists(items):
        ps, ks = [p for p, _, _, _ in items], [k for _, k, _, _ in items]
        ms = [None if m is None else m() for _, _, m, _ in items]
        os_ = [o for _, _, _, o in items]
        extra = {"offsets": os_} if any(os_) else {}
        return ps, ks, (ms if any(m is not None for m in ms) else None), extra

    def perturb_(self, params, keys, *, seed, step, sample=0, scale, dist="normal",
                 masks=None, offsets=None) -> None:
        mine, rest = self._split(params, keys, masks, offsets)
        if rest:
            ps, ks, ms, extra = self._lists(rest)
            self.inner.perturb_(ps, ks, seed=seed, step=step, sample=sample, scale=scale,
                                dist=dist, masks=ms, **extra)
        v = self.virtual
        v.context = (self.inner, seed, step, dist)
        for p, k, m, o in mine:
            d = v.displaced.setdefault(id(p), v.displacement(k, m, o))
            total = d.scales.get(sample, 0.0) + scale
            if total == 0.0:  # exact: the walk's ±ε moves are exact multiples of one value
                d.scales.pop(sample, None)
                if not d.scales:
                    del v.displaced[id(p)]
            else:
                d.scales[sample] = total

    def restore_update_(self, params, keys, *, eps, masks=None, offsets=None, **kw) -> None:
        """The fallback tensors restore and update in one pass; the virtual ones, which were
        never written, get the update alone (eps = 0)."""
        mine, rest = self._split(params, keys, masks, offsets)
        if rest:
            ps, ks, ms, extra = self._lists(rest)
            self.inner.restore_update_(ps, ks, eps=eps, masks=ms, **extra, **kw)
        v = self.virtual
        v.check_consumed()
        for p, _, _, _ in mine:
            v.displaced.pop(id(p), None)
        if not v.displaced:
            v.consumed.clear()
        if mine:
            ps, ks, ms, extra = self._lists(mine)
            self.inner.restore_update_(ps, ks, eps=0.0, masks=ms, **extra, **kw)

    def __getattr__(self, name):  # anything else the step asks of its ops
        return getattr(self.inner, name)


def _mask_getter(masks, i: int):
    """A getter of ``masks[i]`` that unpacks a LazyMask only when called, or None."""
    if masks is None:
        return None
    if isinstance(masks, LazyMask):
        return lambda: masks[i]
    m = masks[i]
    return None if m is None else (lambda: m)
