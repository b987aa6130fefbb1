"""Muon with its Newton-Schulz iteration in float32 (CPUs) against torch's own bf16 Muon."""

import copy

import torch

from chatforge.optim import Muon, newton_schulz

NS = (3.4445, -4.7750, 2.0315)  # torch's (and Keller Jordan's) quintic coefficients


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 176, generator=g) * 0.1),
            torch.nn.Parameter(torch.randn(176, 64, generator=g) * 0.1)]


def _run(opt_cls, params, steps=3, **kw):
    opt = opt_cls(params, lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True, adjust_lr_fn="original", **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


def test_bf16_mode_is_torch_muon_exactly():
    a, b = _params(), _params()
    _run(torch.optim.Muon, a)
    _run(Muon, b, ns_dtype=torch.bfloat16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_float32_mode_matches_torch_within_bf16_rounding_and_keeps_its_state():
    a, b = _params(), _params()
    ref = _run(torch.optim.Muon, a)
    ours = _run(Muon, b, ns_dtype=torch.float32)
    start = _params()
    for x, y, s in zip(a, b, start):
        step_ref, step_ours = x.detach() - s.detach(), y.detach() - s.detach()
        # the same update up to bf16 rounding inside torch's iteration (bf16 has 8 bits of mantissa)
        assert (step_ref - step_ours).norm() / step_ref.norm() < 0.02
    for p, q in zip(a, b):  # momentum buffers are computed in float32 on both sides: identical
        assert torch.equal(ref.state[p]["momentum_buffer"], ours.state[q]["momentum_buffer"])
    # a checkpoint of one loads into the other (same state keys)
    clone = Muon(copy.deepcopy(b), lr=0.02, ns_dtype=torch.float32)
    clone.load_state_dict(ref.state_dict())


def test_newton_schulz_orthogonalises():
    g = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))
    for m in (g, g.T):
        s = torch.linalg.svdvals(newton_schulz(m, 5, NS, 1e-7, torch.float32))
        # Muon's quintic pushes every singular value into roughly [0.7, 1.2] (not exactly 1, by design)
        assert 0.6 < float(s.min()) and float(s.max()) < 1.25
    assert newton_schulz(g.T, 5, NS, 1e-7, torch.float32).shape == (96, 32)
