"""funcdp.optim against torch.optim, step for step."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from helpers import assert_trees_close
from torch import nn

import funcdp
from funcdp import optim

STEPS = 12


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (16,), generator=g)


def run_torch(make_opt, clip=None):
    m = model()
    opt = make_opt(m.parameters())
    history = []
    for t in range(STEPS):
        x, y = data(t)
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(m.parameters(), clip)
        opt.step()
        history.append({n: p.detach().clone() for n, p in m.named_parameters()})
    return history


def run_funcdp(opt, fused=False):
    fm = funcdp.nn.functional(model())
    params = fm.params
    state = opt.init(params)

    def loss(p, x, y):
        return nn.functional.cross_entropy(fm.apply(p, {}, x)[0], y)

    history = []
    for t in range(STEPS):
        x, y = data(t)
        grads = torch.func.grad(loss)(params, x, y)
        if fused:
            params, state = opt.step(grads, state, params)
        else:
            updates, state = opt.update(grads, state, params)
            params = optim.apply_updates(params, updates)
        history.append(params)
    return history


CASES = [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1), optim.sgd(0.1)),
    ("sgd momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
     optim.sgd(0.1, momentum=0.9)),
    ("sgd nesterov wd", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True,
                                                  weight_decay=1e-2),
     optim.sgd(0.05, momentum=0.8, nesterov=True, weight_decay=1e-2)),
    ("sgd dampening", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.3),
     optim.sgd(0.05, momentum=0.5, dampening=0.3)),
    ("sgd maximize", lambda p: torch.optim.SGD(p, lr=0.01, maximize=True),
     optim.sgd(0.01, maximize=True)),
    ("adam", lambda p: torch.optim.Adam(p, lr=1e-2), optim.adam(1e-2)),
    ("adam wd", lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99)),
     optim.adam(1e-2, weight_decay=0.1, betas=(0.8, 0.99))),
    ("adam amsgrad", lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
     optim.adam(1e-2, amsgrad=True)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
     optim.adamw(1e-2, weight_decay=0.1)),
]


@pytest.mark.parametrize("fused", [False, True], ids=["update+apply", "step"])
@pytest.mark.parametrize("name, make_torch, ours", CASES, ids=[c[0] for c in CASES])
def test_matches_torch_optim_step_for_step(name, make_torch, ours, fused):
    ref = run_torch(make_torch)
    got = run_funcdp(ours, fused)
    for t, (a, b) in enumerate(zip(got, ref), start=1):
        # Rounding differences grow (at most) linearly with the number of steps.
        assert_trees_close(a, b, rtol=1e-12 * t, atol=1e-13 * t)


@pytest.mark.parametrize("fused", [False, True])
def test_clip_by_global_norm_matches_clip_grad_norm(fused):
    ref = run_torch(lambda p: torch.optim.SGD(p, lr=0.5), clip=0.05)
    got = run_funcdp(optim.chain(optim.clip_by_global_norm(0.05), optim.sgd(0.5)), fused)
    for t, (a, b) in enumerate(zip(got, ref), start=1):
        assert_trees_close(a, b, rtol=1e-12 * t, atol=1e-13 * t)


def test_schedule_matches_lambda_lr():
    # funcdp schedules are called with the 1-based step of the update being made.
    sched = optim.warmup_cosine_decay(0.1, 3, 10, end=0.01)
    ref = run_torch(lambda p: _lambda(torch.optim.SGD(p, lr=1.0),
                                      lambda t: float(sched(torch.tensor(t + 1)))))
    got = run_funcdp(optim.sgd(sched))
    for t, (a, b) in enumerate(zip(got, ref), start=1):
        assert_trees_close(a, b, rtol=1e-12 * t, atol=1e-13 * t)


class _lambda:
    """torch.optim with a LambdaLR stepped after every optimizer step."""

    def __init__(self, opt, fn):
        self.opt = opt
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self):
        self.opt.step()
        self.sched.step()


def test_schedule_values():
    s = optim.linear_warmup(1.0, 4)
    assert [float(s(torch.tensor(t))) for t in (0, 2, 4, 8)] == [0.0, 0.5, 1.0, 1.0]
    c = optim.cosine_decay(2.0, 10, alpha=0.1)
    assert math.isclose(float(c(torch.tensor(5))), 2.0 * (0.9 * 0.5 + 0.1))
    e = optim.exponential_decay(1.0, 0.5, steps_per_decay=2)
    assert math.isclose(float(e(torch.tensor(4))), 0.25)
    p = optim.piecewise_constant([2, 5], [1.0, 0.1, 0.01])
    assert [float(p(torch.tensor(t))) for t in (0, 1, 2, 4, 5, 9)] == [1.0, 1.0, 0.1, 0.1,
                                                                        0.01, 0.01]
    assert optim.constant(0.3)(torch.tensor(7)) == 0.3


def test_updates_are_pure():
    params = {"w": torch.ones(3)}
    grads = {"w": torch.ones(3)}
    opt = optim.adam(0.1)
    state = opt.init(params)
    before = (params["w"].clone(), grads["w"].clone(), state["mu"]["w"].clone())
    opt.update(grads, state, params)
    assert torch.equal(params["w"], before[0]) and torch.equal(grads["w"], before[1])
    assert torch.equal(state["mu"]["w"], before[2])


def test_optimizer_errors():
    with pytest.raises(ValueError, match="`lr` must be a non-negative number"):
        optim.sgd(-1.0)
    with pytest.raises(ValueError, match="nesterov momentum requires"):
        optim.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match="`betas` must be in"):
        optim.adam(betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="`max_norm` must be positive"):
        optim.clip_by_global_norm(0)
    with pytest.raises(ValueError, match="`updates` has structure"):
        optim.apply_updates({"a": torch.ones(1)}, {"b": torch.ones(1)})


def test_optimizer_state_inside_pmap_matches_single_device():
    """A data-parallel step with replicated optimizer state equals the full-batch step."""
    torch.manual_seed(0)
    fm = funcdp.nn.functional(nn.Linear(4, 2).double())
    opt = optim.adam(1e-2)
    x = torch.randn(4, 8, 4, dtype=torch.float64)
    y = torch.randn(4, 8, 2, dtype=torch.float64)

    def loss(p, x, y):
        return ((fm.apply(p, {}, x)[0] - y) ** 2).mean()

    @funcdp.pmap(axis_name="d", in_axes=(None, None, 0, 0), out_axes=None)
    def step(params, state, x, y):
        _, grads = funcdp.value_and_grad(loss, "d")(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    params, state = fm.params, opt.init(fm.params)
    ref_p, ref_s = fm.params, opt.init(fm.params)
    for _ in range(3):
        params, state = step(params, state, x, y)
        g = torch.func.grad(loss)(ref_p, x.reshape(32, 4), y.reshape(32, 2))
        u, ref_s = opt.update(g, ref_s, ref_p)
        ref_p = optim.apply_updates(ref_p, u)
    assert_trees_close(params, ref_p, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("make", [lambda: optim.adam(0.01, amsgrad=True, weight_decay=0.1),
                                  lambda: optim.chain(optim.clip_by_global_norm(0.5),
                                                      optim.sgd(0.1, momentum=0.9))])
def test_step_under_vmap_is_a_loop_over_members(make):
    # An ensemble trained at once: the optimizer runs under vmap, one model per member.
    opt = make()
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 4, 5, generator=g, dtype=torch.float64),
              "b": torch.randn(3, 5, generator=g, dtype=torch.float64)}
    grads = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64)
              for k, v in params.items()} for _ in range(2)]
    state = torch.func.vmap(opt.init)(params)
    p = params
    for gr in grads:
        p, state = torch.func.vmap(opt.step)(gr, state, p)
    for m in range(3):
        pm = {k: v[m] for k, v in params.items()}
        sm = opt.init(pm)
        for gr in grads:
            pm, sm = opt.step({k: v[m] for k, v in gr.items()}, sm, pm)
        for k in pm:
            assert torch.allclose(p[k][m], pm[k], rtol=1e-12, atol=1e-15)


def test_step_docstring_example():
    # GradientTransformation reports funcdp.optim as its module, so the doctest collector
    # of funcdp/_src/optim.py skips its methods: run the example here.
    import doctest

    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(optim.GradientTransformation.step, "step",
                                             globs={}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 5 and result.failed == 0


@pytest.mark.parametrize("make, arg, value", [
    (lambda v: optim.sgd(0.1, momentum=v), "momentum", -0.5),
    (lambda v: optim.sgd(0.1, dampening=v), "dampening", -1.0),
    (lambda v: optim.sgd(0.1, weight_decay=v), "weight_decay", float("nan")),
    (lambda v: optim.adam(1e-3, eps=v), "eps", -1.0),
    (lambda v: optim.adamw(1e-3, weight_decay=v), "weight_decay", -1.0),
    (lambda v: optim.adam(1e-3, eps=v), "eps", "1e-8"),
])
def test_error_negative_hyperparameters(make, arg, value):
    # As torch.optim: a negative momentum, eps or weight decay is an error at construction.
    with pytest.raises(ValueError, match=rf"`{arg}` must be a non-negative number, got"):
        make(value)


@pytest.mark.parametrize("betas", [0.9, (0.9,), (0.9, 0.99, 0.999), ("0.9", 0.99), None])
def test_error_betas_not_a_pair(betas):
    with pytest.raises(ValueError, match=r"`betas` must be a pair of numbers in \[0, 1\), "
                                         r"such as \(0.9, 0.999\), got"):
        optim.adam(1e-3, betas=betas)


@pytest.mark.parametrize("fused", [False, True])
def test_error_state_of_another_optimizer(fused):
    # Was a KeyError ('mu', 'momentum') or an unpacking error deep in the step.
    params = {"w": torch.ones(3)}
    grads = {"w": torch.full((3,), 0.5)}

    def step(opt, state):
        return (opt.step if fused else opt.update)(grads, state, params)

    sgd, momentum, adam = optim.sgd(0.1), optim.sgd(0.1, momentum=0.9), optim.adam(0.1)
    with pytest.raises(ValueError, match=r"^funcdp.optim.adam: `state` must be the state this "
                                         r"optimizer's init\(params\) makes, a dict with keys "
                                         r"\['step', 'mu', 'nu'\]; got a dict with keys "
                                         r"\['step'\]\. Was it made by another optimizer"):
        step(adam, sgd.init(params))
    with pytest.raises(ValueError, match=r"^funcdp.optim.sgd: `state` must be .* keys "
                                         r"\['step', 'momentum'\]; got a dict with keys "
                                         r"\['mu', 'nu', 'step'\]"):
        step(momentum, adam.init(params))
    chained = optim.chain(optim.clip_by_global_norm(1.0), adam)
    with pytest.raises(ValueError, match=r"funcdp.optim.adam: `state` must be .*; got a tuple\."):
        step(adam, chained.init(params))
    with pytest.raises(ValueError, match=r"^funcdp.optim.chain: `state` must be the chain's "
                                         r"state, a tuple of 2 .*; got a dict\."):
        step(chained, adam.init(params))
    with pytest.raises(ValueError, match=r"a tuple of 2 .*; got a tuple of 1\."):
        step(chained, (adam.init(params),))
    # (What sgd without momentum needs, a step count, any of them has.)
    assert step(sgd, adam.init(params))[1]["step"] == 1


@pytest.mark.parametrize("fused", [False, True])
def test_states_and_members_of_other_types_work(fused):
    # A chain's state as a list (as a serializer may give it back), a state in a
    # read-only mapping, and a member of the user's own with init/update (no step) are
    # used as they are (they were rejected).
    params = {"w": torch.ones(3)}
    grads = {"w": torch.full((3,), 0.5)}

    class Negate:  # (an optax-style transformation of one's own)
        def init(self, params):
            return {}

        def update(self, grads, state, params=None):
            return {k: -v for k, v in grads.items()}, state

        def step(self, grads, state, params):  # (its own, without axis_name: not called)
            raise AssertionError("a step of the user's own is not funcdp's to call")

    def run(opt, state):
        out = (opt.step if fused else opt.update)(grads, state, params)
        return out[0]

    chained = optim.chain(optim.clip_by_global_norm(0.1), optim.sgd(0.5))
    assert_trees_close(run(chained, list(chained.init(params))),
                       run(chained, chained.init(params)))
    adam = optim.adam(0.1)
    assert_trees_close(run(adam, types.MappingProxyType(adam.init(params))),
                       run(adam, adam.init(params)))
    mine = optim.chain(optim.clip_by_global_norm(0.1), Negate())
    want = {"w": -grads["w"] * min(1.0, 0.1 / (float(grads["w"].norm()) + 1e-6))}
    if fused:
        want = {"w": params["w"] + want["w"]}
    assert_trees_close(run(mine, mine.init(params)), want)
    # value_and_update takes it too, with and without an axis.
    loss = lambda w, x: ((x * w["w"]) ** 2).sum()  # noqa: E731
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    alone = funcdp.value_and_update(loss, Negate())(params, {}, x[0])
    assert_trees_close(alone[1], {"w": params["w"] - 2 * x[0] ** 2})
    step = funcdp.pmap(funcdp.value_and_update(loss, Negate(), "i"), axis_name="i",
                       in_axes=(None, None, 0), out_axes=None, devices=funcdp.local_devices()[:2])
    _, new, _ = step(params, {}, x)
    assert_trees_close(new, {"w": params["w"] - (x ** 2).sum(0)})
    with pytest.raises(TypeError, match=r"got the class Negate \(pass an instance: "
                                        r"Negate\(\.\.\.\)\)"):
        optim.chain(Negate)
    with pytest.raises(TypeError, match=r"`optimizer` must be .*, got the class Negate"):
        funcdp.value_and_update(loss, Negate)


def test_error_chain_of_something_else():
    with pytest.raises(TypeError, match=r"^funcdp.optim.chain: argument 1 must be a "
                                        r"GradientTransformation .*, got a SGD\.$"):
        optim.chain(optim.clip_by_global_norm(1.0),
                    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))


@pytest.mark.parametrize("opt", [optim.sgd(0.1, momentum=0.9), optim.adam(0.1),
                                 optim.adamw(0.1, weight_decay=0.1)])
@pytest.mark.parametrize("fused", [False, True])
def test_error_state_or_params_of_other_shapes(opt, fused):
    # The same structure, other shapes (the state of another model of the same layout):
    # was a broadcasting error from torch, or a silently broadcast step.
    grads = {"b": torch.ones(2), "w": torch.ones(3)}
    step = opt.step if fused else opt.update
    params = {"b": torch.zeros(2), "w": torch.zeros(3)}
    other = {"b": torch.zeros(2), "w": torch.zeros(2, 3)}
    key = "momentum" if "momentum" in opt.init(params) else "mu"
    with pytest.raises(ValueError, match=rf"state\['{key}'\]\['w'\] has shape \(2, 3\), but "
                                         r"its gradient grads\['w'\] has shape \(3,\)\. The "
                                         r"gradients, the parameters and the optimizer state"):
        step(grads, opt.init(other), params)
    with pytest.raises(ValueError, match=r"params\['w'\] has shape \(2, 3\), but its "
                                         r"gradient grads\['w'\] has shape \(3,\)"):
        step(grads, opt.init(params), other)
    # A leaf that is not a tensor but has a shape (a ShardedValue) is named by its shape.
    with pytest.raises(ValueError, match=r"params\['w'\] has shape \(1, 3\), but"):
        one = funcdp.local_devices()[:1]
        step(grads, opt.init(params), {"b": params["b"], "w": funcdp.replicate(params["w"], one)})
    # A replicated state used outside the pmap: its step has a device axis (was torch's
    # "only one element tensors can be converted" for Adam, a broadcast step for SGD).
    replicated = funcdp.replicate(opt.init(params), funcdp.local_devices()[:2])
    with pytest.raises(ValueError, match=r"state\['step'\] has shape \(2,\); a state has one "
                                         r"step, of shape \(\)\..*funcdp\.unreplicate"):
        step(grads, replicated, params)
    assert_trees_close(step(grads, funcdp.unreplicate(replicated), params),
                       step(grads, opt.init(params), params))


class _Linear:  # a pytree node registered without key paths
    def __init__(self, w, b):
        self.w, self.b = w, b


torch.utils._pytree.register_pytree_node(_Linear, lambda o: ([o.w, o.b], None),
                                         lambda xs, _: _Linear(*xs))


def test_shape_error_for_a_node_without_key_paths():
    # Was torch's "Did not find a flatten_with_keys_fn" while wording the error.
    adam = optim.adam(0.1)
    grads, params = _Linear(torch.ones(3), torch.ones(2)), _Linear(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"state\['mu'\]\[0\] has shape \(2, 3\), but its "
                                         r"gradient grads\[0\] has shape \(3,\)"):
        adam.update(grads, adam.init(_Linear(torch.zeros(2, 3), torch.zeros(2))), params)


@pytest.mark.parametrize("opt", [optim.sgd(0.1, momentum=0.9, weight_decay=0.1),
                                 optim.adamw(0.1)])
@pytest.mark.parametrize("fused", [False, True])
def test_error_grads_and_params_with_dict_keys_in_another_order(opt, fused):
    # update() paired the leaves in order, decaying 'a' with the weight of 'b'.
    grads = {"a": torch.ones(2), "b": torch.ones(2)}
    params = {"b": torch.full((2,), 100.0), "a": torch.zeros(2)}
    step = opt.step if fused else opt.update
    with pytest.raises(ValueError, match=r"`grads` has structure .*, but `params` has .* They "
                                         r"hold the same dict keys in another order.*"
                                         r"grads = \{k: grads\[k\] for k in params\}"):
        step(grads, opt.init(grads), params)
    with pytest.raises(ValueError, match=r"`params` has .*\. Pass the gradients of the "
                                         r"parameters being updated"):
        step(grads, opt.init(grads), {"a": torch.zeros(2), "c": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"made for parameters of structure .* They hold the "
                                         r"same dict keys in another order"):
        step(grads, opt.init(params), grads)


@pytest.mark.parametrize("opt", [optim.sgd(0.1), optim.sgd(0.1, momentum=0.9), optim.adam(),
                                 optim.adamw(amsgrad=True)])
def test_tree_without_leaves(opt):
    # Was torch's "Tensor list must have at least one tensor".
    updates, state = opt.update({}, opt.init({}), {})
    assert updates == {} and int(state["step"]) == 1
    params, state = opt.step({}, opt.init({}), {})
    assert params == {} and int(state["step"]) == 1


def test_error_step_without_params():
    # Was a "step" of the gradients themselves, returned as the new parameters.
    opt = optim.sgd(0.1)
    with pytest.raises(ValueError, match=r"`params` is None, but step\(grads, state, params\) "
                                         r"updates them"):
        opt.step({"w": torch.ones(2)}, opt.init({"w": torch.ones(2)}), None)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("make_torch, ours", [
    (lambda p, f: torch.optim.Adam(p, lr=0.01, foreach=f), optim.adam(0.01)),
    (lambda p, f: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, foreach=f),
     optim.adamw(0.01, weight_decay=0.1)),
], ids=["adam", "adamw"])
def test_adam_in_bfloat16_equals_torch_optim_exactly(make_torch, ours, foreach):
    # The second moment was nu * b2 + (g * g) * (1 - b2), rounding g * g: an ulp off
    # torch's addcmul in about a quarter of the entries.
    torch.manual_seed(0)
    p0 = torch.randn(4096, dtype=torch.bfloat16)
    grads = [torch.randn(4096, dtype=torch.bfloat16) for _ in range(3)]
    tp = p0.clone().requires_grad_()
    ref = make_torch([tp], foreach)
    params = {"w": p0.clone()}
    state = ours.init(params)
    for g in grads:
        tp.grad = g.clone()
        ref.step()
        params, state = ours.step({"w": g}, state, params)
    assert torch.equal(state["nu"]["w"], ref.state[tp]["exp_avg_sq"])
    assert torch.equal(params["w"], tp.detach())


# -- gradients of another dtype ---------------------------------------------------------
@pytest.mark.parametrize("opt", [optim.sgd(0.1), optim.sgd(0.1, momentum=0.9),
                                 optim.adam(0.1), optim.adamw(0.1, amsgrad=True)])
@pytest.mark.parametrize("fused", [False, True])
def test_error_gradient_of_another_dtype(opt, fused):
    # SGD silently made the bfloat16 parameters (and momentum) float32; Adam raised
    # torch's "expected dtype c10::BFloat16 for `end`" from _foreach_lerp.
    params = {"b": torch.zeros(2, dtype=torch.bfloat16), "w": torch.ones(3, dtype=torch.bfloat16)}
    grads = {"b": torch.ones(2, dtype=torch.bfloat16), "w": torch.full((3,), 0.5)}
    step = opt.step if fused else opt.update
    with pytest.raises(ValueError, match=r"^funcdp.optim.\w+: grads\['w'\] has dtype "
                                         r"torch.float32, but its parameter params\['w'\] has "
                                         r"dtype torch.bfloat16; .*Cast the gradients .*"
                                         r"g\.to\(p\.dtype\)"):
        step(grads, opt.init(params), params)
    # torch refuses such a gradient too.
    p = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="dtype"):
        p.grad = torch.full((3,), 0.5)
    # The cast the message proposes works.
    cast = torch.utils._pytree.tree_map(lambda g, p: g.to(p.dtype), grads, params)
    out = step(cast, opt.init(params), params)[0]
    assert all(v.dtype == torch.bfloat16 for v in out.values())


@pytest.mark.parametrize("opt", [optim.sgd(0.1, momentum=0.9), optim.adam(0.1)])
@pytest.mark.parametrize("with_params", [False, True])
def test_error_state_of_another_dtype(opt, with_params):
    # A state made for float32 parameters, used with bfloat16 ones (the model cast after
    # opt.init): SGD's momentum silently promoted the step to float32.
    params = {"w": torch.ones(3, dtype=torch.bfloat16)}
    grads = {"w": torch.ones(3, dtype=torch.bfloat16)}
    state = opt.init({"w": torch.ones(3)})
    key = "momentum" if "momentum" in state else "mu"
    with pytest.raises(ValueError, match=rf"state\['{key}'\]\['w'\] has dtype torch.float32, "
                                         r"but its gradient grads\['w'\] has dtype "
                                         r"torch.bfloat16\. .*opt\.init\(params\)"):
        opt.update(grads, state, params if with_params else None)


# -- None gradients: the parameter is left as it is -----------------------------------
# Which gradients are None at each of 5 steps ("c" at none, as a parameter the loss never
# uses; "b" at some, as a routed expert that no example of the batch reached).
NONE_AT = {"never": {"c": range(5)}, "sometimes": {"b": (0, 2, 3), "c": range(5)}}


def _none_steps(make_torch, ours, pattern, fused):
    """``ours`` and ``make_torch`` trained with the gradients of ``NONE_AT[pattern]`` None;
    the parameters after every step of each."""
    g = torch.Generator().manual_seed(0)
    init = {k: torch.randn(4, generator=g, dtype=torch.float64) for k in "abc"}
    grads = [{k: torch.randn(4, generator=g, dtype=torch.float64) for k in "abc"}
             for _ in range(5)]
    for t, gr in enumerate(grads):
        for k, steps in NONE_AT[pattern].items():
            if t in steps:
                gr[k] = None
    tp = {k: nn.Parameter(v.clone()) for k, v in init.items()}
    ref = make_torch(list(tp.values()))
    params, state = dict(init), ours.init(init)
    got, want = [], []
    for gr in grads:
        for k, p in tp.items():
            p.grad = None if gr[k] is None else gr[k].clone()
        ref.step()
        want.append({k: p.detach().clone() for k, p in tp.items()})
        if fused:
            new, new_state = ours.step(gr, state, params)
        else:
            updates, new_state = ours.update(gr, state, params)
            assert all((updates[k] is None) == (gr[k] is None) for k in gr)
            new = optim.apply_updates(params, updates)
        # (A chain's state: that of its optimizer, the last member.)
        old, now = (state[-1], new_state[-1]) if isinstance(state, tuple) else (state, new_state)
        for k in gr:
            if gr[k] is None:  # left as it was, and its state too
                assert new[k] is params[k]
                for key, tree in old.items():
                    if isinstance(tree, dict):
                        assert now[key][k] is tree[k]
        assert int(now["step"]) == int(old["step"]) + 1  # the global count
        params, state = new, new_state
        got.append(params)
    return got, want


# Where the update does not depend on how many gradients a parameter has had before,
# every pattern; Adam's bias correction and SGD's dampening of the first gradient do
# (torch counts a parameter's own steps, funcdp all updates: see docs/training.md), so
# those only where a parameter has a gradient at every step or at none.
NONE_CASES = [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1), optim.sgd(0.1), NONE_AT),
    ("sgd momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
     optim.sgd(0.1, momentum=0.9), NONE_AT),
    ("sgd nesterov wd", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True,
                                                  weight_decay=1e-2, maximize=True),
     optim.sgd(0.05, momentum=0.8, nesterov=True, weight_decay=1e-2, maximize=True), NONE_AT),
    ("sgd dampening", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.3),
     optim.sgd(0.05, momentum=0.5, dampening=0.3), ["never"]),
    ("adam wd", lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
     optim.adam(1e-2, weight_decay=0.1), ["never"]),
    ("adamw amsgrad", lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
     optim.adamw(1e-2, amsgrad=True), ["never"]),
    ("clip sgd", lambda p: _clipped(torch.optim.SGD(p, lr=0.5, momentum=0.9), p, 0.5),
     optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(0.5, momentum=0.9)), NONE_AT),
]


@pytest.mark.parametrize("fused", [False, True], ids=["update+apply", "step"])
@pytest.mark.parametrize("name, make_torch, ours, patterns", NONE_CASES,
                         ids=[c[0] for c in NONE_CASES])
def test_none_gradients_leave_their_parameters_as_torch_optim_does(name, make_torch, ours,
                                                                    patterns, fused):
    # Were an AttributeError ('NoneType' object has no attribute 'shape') or torch's
    # "expected Tensor as element 1" from the foreach kernels.
    for pattern in patterns:
        got, want = _none_steps(make_torch, ours, pattern, fused)
        for t, (a, b) in enumerate(zip(got, want), start=1):
            assert_trees_close(a, b, rtol=1e-12 * t, atol=1e-13 * t)


class _clipped:
    """torch.optim with clip_grad_norm_ before every step (it skips None gradients)."""

    def __init__(self, opt, params, max_norm):
        self.opt, self.params, self.max_norm = opt, params, max_norm

    def step(self):
        nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()


def test_none_gradients_in_global_norm_and_apply_updates():
    grads = {"a": torch.tensor([3.0, 4.0]), "b": None, "c": torch.tensor([12.0])}
    assert torch.equal(optim.global_norm(grads), torch.tensor(13.0))
    assert torch.equal(optim.global_norm({"b": None}), torch.tensor(0.0))
    params = {"a": torch.zeros(2), "b": torch.ones(1), "c": torch.zeros(1)}
    new = optim.apply_updates(params, grads)
    assert new["b"] is params["b"]
    assert_trees_close(new, {"a": grads["a"], "b": params["b"], "c": grads["c"]})
    with pytest.raises(TypeError, match=r"^funcdp.optim.apply_updates: params\['b'\] is None, "
                                        r"not a tensor, but its update updates\['b'\] is"):
        optim.apply_updates({"a": torch.zeros(2), "b": None}, {"a": None, "b": torch.ones(1)})


def test_all_gradients_none():
    # The step still counts (see docs/training.md); nothing else changes.
    opt = optim.adam(0.1)
    params = {"w": torch.ones(2)}
    state = opt.init(params)
    new, new_state = opt.step({"w": None}, state, params)
    assert new["w"] is params["w"] and new_state["mu"]["w"] is state["mu"]["w"]
    assert int(new_state["step"]) == 1
    updates, _ = opt.update({"w": None}, state, params)
    assert updates == {"w": None}


def test_none_gradients_under_vmap():
    opt = optim.adam(0.1)
    params = {"w": torch.ones(3, 2), "b": torch.zeros(3, 2)}
    grads = {"w": torch.full((3, 2), 0.5), "b": None}
    state = torch.func.vmap(opt.init)(params)
    new, state = torch.func.vmap(opt.step, in_dims=({"w": 0, "b": None}, 0, 0))(grads, state,
                                                                               params)
    want, _ = opt.step({"w": grads["w"]}, opt.init({"w": params["w"]}), {"w": params["w"]})
    assert torch.equal(new["w"], want["w"]) and torch.equal(new["b"], params["b"])


@pytest.mark.parametrize("make", [lambda: optim.sgd(0.1, momentum=0.9),
                                  lambda: optim.adamw(0.01, amsgrad=True)])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("how", ["step", "value_and_update"])
def test_none_gradients_in_a_shared_step(devices, make, n, how):
    # Inside pmap the devices share the update of the large leaves (shared_update), in the
    # gradients' average's round with value_and_update (whose own gradients are never
    # None: this calls its step as it does); the None leaves stay out of it, and the
    # results are those of the unshared step, bit for bit.
    from funcdp._src.optim import step_of_mean
    from funcdp._src.shared_update import _SHARED_MIN_NUMEL, Mean

    opt = make()
    g = torch.Generator().manual_seed(0)
    sizes = {"big": _SHARED_MIN_NUMEL, "none": _SHARED_MIN_NUMEL, "small": 5}
    params = {k: torch.randn(s, generator=g) for k, s in sizes.items()}
    per_device = [{k: None if k == "none" else torch.randn(n, s, generator=g)
                   for k, s in sizes.items()} for _ in range(2)]
    mean = lambda v, grads: (funcdp.pmean(v, "i"), funcdp.pmean(grads, "i"))  # noqa: E731

    def step(shared):
        def f(grads, state, params):
            if not shared:
                return opt.step(funcdp.pmean(grads, "i"), state, params)
            if how == "step":
                return opt.step(funcdp.pmean(grads, "i"), state, params, axis_name="i")
            return step_of_mean(opt, grads, state, params, "i",
                                Mean(grads["small"].sum(), mean, "test"))

        return funcdp.pmap(f, axis_name="i", in_axes=(0, None, None), out_axes=(0, None),
                           devices=devices[:n])

    results = []
    for shared in (True, False):
        p, state = params, opt.init(params)
        for grads in per_device:
            new, state = step(shared)(grads, state, p)
            if shared:  # (one tensor for all devices: the update was shared)
                assert new["big"][0].data_ptr() == new["big"][n - 1].data_ptr()
            p = {k: v[0] for k, v in new.items()}
            assert torch.equal(p["none"], params["none"])
        results.append((p, state))
    assert_trees_close(results[0], results[1], exact=True)


@pytest.mark.parametrize("opt", [optim.sgd(0.1), optim.sgd(0.1, momentum=0.9), optim.adam(0.1),
                                 optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1))])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("leaf", [np.ones(2, dtype=np.float32), 0.5], ids=["numpy", "float"])
def test_error_gradient_that_is_not_a_tensor(opt, fused, leaf):
    # Were torch's "expected Tensor as element 1 in argument 0" or an AttributeError.
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    grads = {"a": torch.ones(2), "b": leaf}
    step = opt.step if fused else opt.update
    with pytest.raises(TypeError, match=r"^funcdp.optim.\w+: grads\['b'\] is an? \w+, not a "
                                        r"tensor\. .*torch.as_tensor"):
        step(grads, opt.init(params), params)
    with pytest.raises(TypeError, match=r"^funcdp.optim.global_norm: tree\['b'\] is an? \w+, "
                                        r"not a tensor"):
        optim.global_norm(grads)
    with pytest.raises(TypeError, match=r"^funcdp.optim.apply_updates: updates\['b'\] is an? "
                                        r"\w+, not a tensor"):
        optim.apply_updates(params, grads)


@pytest.mark.parametrize("make", [lambda: optim.sgd(0.1), lambda: optim.sgd(0.1, momentum=0.9),
                                  lambda: optim.adamw()])
@pytest.mark.parametrize("leaf, what", [(None, "None"), (0.5, "a float"),
                                        (np.zeros(2), "an? ndarray")])
def test_error_init_of_a_parameter_that_is_not_a_tensor(make, leaf, what):
    # Were torch's "zeros_like(): argument 'input' (position 1) must be Tensor" (or, for
    # SGD, nothing until the first step).
    with pytest.raises(TypeError, match=rf"^funcdp.optim.\w+: init\(params\): "
                                        rf"params\[1\]\['b'\] is {what}, not a tensor\."):
        make().init([{"a": torch.zeros(2)}, {"b": leaf}])


# -- schedules --------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: optim.constant("a"), r"constant: `value` must be a non-negative number \(a "
                                  r"learning rate, such as 0.1\), got 'a'\."),
    (lambda: optim.constant(-1.0), r"constant: `value` must be a non-negative number"),
    (lambda: optim.linear_warmup(1.0, -3), r"linear_warmup: `warmup_steps` must be a "
                                           r"non-negative number of steps \(.*\), got -3\."),
    (lambda: optim.linear_warmup(-1.0, 3), r"linear_warmup: `peak` must be a non-negative"),
    (lambda: optim.linear_warmup(1.0, 3, start=float("nan")),
     r"linear_warmup: `start` must be a non-neg"),
    (lambda: optim.cosine_decay(1.0, 0), r"cosine_decay: `decay_steps` must be a positive "
                                         r"number of steps \(.*\), got 0\."),
    (lambda: optim.cosine_decay(1.0, 10, alpha=2.0), r"cosine_decay: `alpha` must be a number "
                                                     r"in \[0, 1\]"),
    (lambda: optim.exponential_decay(1.0, 0.5, steps_per_decay=0),
     r"exponential_decay: `steps_per_decay` must be a positive number of steps \(.*\), "
     r"got 0\."),
    (lambda: optim.exponential_decay(1.0, -0.5), r"exponential_decay: `rate` must be a "
                                                 r"positive number .*, got -0\.5\."),
    (lambda: optim.exponential_decay(1.0, 0), r"exponential_decay: `rate` must be a positive"),
    (lambda: optim.warmup_cosine_decay(1.0, 10, 5),
     r"warmup_cosine_decay: `decay_steps` \(the step at which the decay ends, counted from the "
     r"first, the warmup included\) must be greater than `warmup_steps`, got decay_steps=5 and "
     r"warmup_steps=10\. For n steps of decay after the warmup, pass "
     r"decay_steps=warmup_steps \+ n\."),
    (lambda: optim.warmup_cosine_decay(1.0, 10, 10),
     r"warmup_cosine_decay: `decay_steps` .* must be greater than `warmup_steps`"),
    (lambda: optim.warmup_cosine_decay(1.0, -1, 10), r"warmup_cosine_decay: `warmup_steps` must "
                                                       r"be a non-negative"),
    (lambda: optim.piecewise_constant([20, 10], [1.0, 0.1, 0.01]),
     r"piecewise_constant: `boundaries` must be strictly increasing .*, got \[20, 10\]"),
    (lambda: optim.piecewise_constant([10, 10], [1.0, 0.1, 0.01]),
     r"piecewise_constant: `boundaries` must be strictly increasing"),
    (lambda: optim.piecewise_constant([10], [1.0]),
     r"piecewise_constant: `values` must have one entry more than `boundaries` .*, got 1 "
     r"values for 1 boundaries"),
    (lambda: optim.piecewise_constant([10], [1.0, -0.1]),
     r"piecewise_constant: `values\[1\]` must be a non-negative number"),
    (lambda: optim.piecewise_constant([2, "x"], [1.0, 0.1, 0.0]),
     r"piecewise_constant: `boundaries\[1\]` must be a non-negative number of steps "
     r"\(the update at which the value changes\), got 'x'"),
    (lambda: optim.piecewise_constant("10", [1.0, 0.1]),
     r"piecewise_constant: `boundaries` must be a list of numbers \(or a 1-D array or "
     r"tensor\), got a str"),
])
def test_error_schedule_arguments(make, match):
    # Each made a schedule of nonsense (a negative or NaN learning rate, 0/0, a value that
    # jumped back), or failed at the first step with torch's error.
    with pytest.raises(ValueError, match=r"^funcdp.optim." + match):
        make()


def test_schedules_at_the_edges_of_their_arguments():
    at = lambda s, steps: [float(s(torch.tensor(t))) for t in steps]  # noqa: E731
    assert at(optim.linear_warmup(1.0, 0), (1, 5)) == [1.0, 1.0]  # no warmup
    assert at(optim.warmup_cosine_decay(1.0, 2, 3, end=0.5), (1, 2, 3, 9)) == [0.5, 1.0, 0.5,
                                                                               0.5]
    assert at(optim.cosine_decay(2.0, 4, alpha=1.0), (1, 9)) == [2.0, 2.0]
    assert at(optim.exponential_decay(1.0, 2.0, steps_per_decay=2.5), (5,)) == [4.0]
    assert at(optim.piecewise_constant([], [0.3]), (1, 100)) == [0.3, 0.3]
    assert optim.constant(0)(torch.tensor(1)) == 0


# Each schedule made of plain Python numbers, and a maker of the same schedule from other
# kinds of numbers: NumPy numbers, 0-d arrays and tensors of any device-free dtype, 1-D
# arrays and tensors for piecewise_constant's lists.
_SAME_SCHEDULES = [
    (optim.constant(0.1), lambda n: optim.constant(n(0.1))),
    (optim.linear_warmup(0.8, 4, start=0.2),
     lambda n: optim.linear_warmup(n(0.8), n(4), start=n(0.2))),
    (optim.cosine_decay(0.5, 10, alpha=0.25),
     lambda n: optim.cosine_decay(n(0.5), n(10), alpha=n(0.25))),
    (optim.exponential_decay(0.5, 0.5, steps_per_decay=2),
     lambda n: optim.exponential_decay(n(0.5), n(0.5), steps_per_decay=n(2))),
    (optim.warmup_cosine_decay(0.5, 2, 10, end=0.125),
     lambda n: optim.warmup_cosine_decay(n(0.5), n(2), n(10), end=n(0.125))),
    (optim.piecewise_constant([3, 5], [1.0, 0.5, 0.25]),
     lambda n: optim.piecewise_constant([n(3), n(5)], [n(1.0), n(0.5), n(0.25)])),
]
_NUMBERS = {
    "numpy scalar": np.float64, "numpy 0-d": np.array, "float32 numpy 0-d":
    lambda x: np.array(x, dtype=np.float32 if isinstance(x, float) else np.int32),
    "tensor": torch.tensor, "float64 tensor": lambda x: torch.tensor(x, dtype=torch.float64),
    "one-element tensor": lambda x: torch.tensor([x]),
}


@pytest.mark.parametrize("kind", list(_NUMBERS))
@pytest.mark.parametrize("plain, make", _SAME_SCHEDULES, ids=[
    "constant", "linear_warmup", "cosine_decay", "exponential_decay", "warmup_cosine_decay",
    "piecewise_constant"])
def test_schedules_take_numpy_numbers_and_tensors(plain, make, kind):
    # The argument checks of the schedules (made to refuse negative, NaN, ...) refused every
    # tensor and NumPy array, which the schedules had taken: constant(torch.tensor(0.1)),
    # piecewise_constant(np.array([3, 5]), ...) raised ValueError.
    s = make(_NUMBERS[kind])
    for t in (1, 2, 3, 4, 5, 9, 12):
        assert float(s(torch.tensor(t))) == pytest.approx(float(plain(torch.tensor(t))),
                                                          rel=1e-6)
    opt = optim.sgd(s)
    params = {"b": torch.ones(()), "w": torch.ones(2)}  # (a 0-d parameter keeps its shape)
    updates, _ = opt.update(params, opt.init(params), params)
    lr = float(plain(torch.tensor(1)))
    assert_trees_close(updates, {"b": torch.tensor(-lr), "w": torch.full((2,), -lr)},
                       rtol=1e-6)


@pytest.mark.parametrize("boundaries, values", [
    (np.array([3, 5]), [1.0, 0.1, 0.01]),
    (np.array([3.0, 5.0]), np.array([1.0, 0.1, 0.01], dtype=np.float32)),
    (torch.tensor([3, 5]), torch.tensor([1.0, 0.1, 0.01])),
    (torch.tensor([3, 5]), (1.0, 0.1, 0.01)),
    (range(3, 6, 2), np.array([1.0, 0.1, 0.01])),
    (np.array([], dtype=np.int64), torch.tensor([1.0, 0.1, 0.01])[:1]),
])
def test_piecewise_constant_takes_arrays_and_tensors(boundaries, values):
    # (the reproducer of the regression: both raised "`boundaries` must be a list of numbers")
    s = optim.piecewise_constant(boundaries, values)
    got = [float(s(torch.tensor(t))) for t in (1, 3, 4, 5, 9)]
    want = [1.0, 0.1, 0.1, 0.01, 0.01] if len(boundaries) else [1.0] * 5
    assert got == pytest.approx(want, rel=1e-6)


def test_schedule_of_a_learning_rate_under_torch_func():
    # A learning rate vmapped over (a sweep) cannot be read to be checked; it was taken.
    lrs = torch.tensor([1.0, 2.0])
    got = torch.func.vmap(lambda lr: optim.linear_warmup(lr, 4)(torch.tensor(2)))(lrs)
    assert got.tolist() == [0.5, 1.0]
    got = torch.func.vmap(lambda n: optim.linear_warmup(1.0, n)(torch.tensor(2)))(lrs * 2)
    assert got.tolist() == [1.0, 0.5]
    got = torch.func.grad(lambda lr: optim.cosine_decay(lr, 10)(torch.tensor(5)))(
        torch.tensor(2.0, dtype=torch.float64))
    assert float(got) == pytest.approx(0.5)


def test_schedule_of_ones_own_returning_a_numpy_number():
    # A 0-d NumPy array from one's own schedule was taken as the learning rate.
    params = {"w": torch.ones(2)}
    for lr in (np.array(0.5), np.float32(0.5)):
        opt = optim.sgd(lambda step, lr=lr: lr)
        updates, _ = opt.update({"w": torch.ones(2)}, opt.init(params), params)
        assert_trees_close(updates, {"w": torch.full((2,), -0.5)})
    opt = optim.sgd(lambda step: np.array(-0.5))
    with pytest.raises(ValueError, match=r"returned array\(-0\.5\) for step 1; a learning "
                                         r"rate must be a non-negative number"):
        opt.update({"w": torch.ones(2)}, opt.init(params), params)


@pytest.mark.parametrize("make, match", [
    (lambda: optim.constant(torch.tensor(-0.1)),
     r"constant: `value` must be a non-negative number .*, got tensor\(-0\.1000\)\."),
    (lambda: optim.constant(np.array(float("nan"))), r"constant: `value` must be a non-neg"),
    (lambda: optim.constant(torch.tensor([0.1, 0.2])), r"constant: `value` must be a non-neg"),
    (lambda: optim.constant(torch.tensor(True)), r"constant: `value` must be a non-neg"),
    (lambda: optim.constant(np.bool_(True)), r"constant: `value` must be a non-neg"),
    (lambda: optim.constant(torch.tensor(0.1j)), r"constant: `value` must be a non-neg"),
    (lambda: optim.linear_warmup(torch.tensor(1.0), np.int64(-2)),
     r"linear_warmup: `warmup_steps` must be a non-negative number of steps .*, got "
     r"np.int64\(-2\)\."),
    (lambda: optim.cosine_decay(1.0, torch.tensor(0)),
     r"cosine_decay: `decay_steps` must be a positive number of steps"),
    (lambda: optim.cosine_decay(1.0, 10, alpha=torch.tensor(1.5)),
     r"cosine_decay: `alpha` must be a number in \[0, 1\]"),
    (lambda: optim.exponential_decay(1.0, np.float64(0.0)),
     r"exponential_decay: `rate` must be a positive number"),
    (lambda: optim.warmup_cosine_decay(1.0, torch.tensor(10), np.array(5)),
     r"warmup_cosine_decay: `decay_steps` .* must be greater than `warmup_steps`, got "
     r"decay_steps=5 and warmup_steps=10\."),
    (lambda: optim.piecewise_constant(np.array([5, 3]), [1.0, 0.1, 0.01]),
     r"piecewise_constant: `boundaries` must be strictly increasing .*, got \[5, 3\];"),
    (lambda: optim.piecewise_constant(torch.tensor([3.0, float("nan")]), [1.0, 0.1, 0.01]),
     r"piecewise_constant: `boundaries\[1\]` must be a non-negative number of steps"),
    (lambda: optim.piecewise_constant(torch.tensor([3, 5]), torch.tensor([1.0, -0.1, 0.0])),
     r"piecewise_constant: `values\[1\]` must be a non-negative number"),
    (lambda: optim.piecewise_constant(torch.tensor([[3, 5]]), [1.0, 0.1, 0.01]),
     r"piecewise_constant: `boundaries` must be a list of numbers \(or a 1-D array or "
     r"tensor\), got a Tensor of shape \(1, 2\)\."),
    (lambda: optim.piecewise_constant([3], np.array(0.1)),
     r"piecewise_constant: `values` must be a list of numbers .*, got a ndarray of shape "
     r"\(\)\."),
])
def test_error_schedule_arguments_of_numpy_and_torch(make, match):
    # The nonsense that test_error_schedule_arguments refuses, in arrays and tensors.
    with pytest.raises(ValueError, match=r"^funcdp.optim." + match):
        make()


@pytest.mark.parametrize("make", [optim.sgd, optim.adam])
@pytest.mark.parametrize("fused", [False, True])
def test_error_schedule_value_negative_at_a_step(make, fused):
    # A learning rate of one's own that goes below 0 made the step ascend, silently.
    opt = make(lambda step: 0.2 - 0.1 * float(step))
    params = {"w": torch.ones(2)}
    grads = {"w": torch.ones(2)}
    step = opt.step if fused else opt.update
    state = step(grads, opt.init(params), params)[1]  # step 1: 0.1
    state = step(grads, state, params)[1]  # step 2: 0.0
    with pytest.raises(ValueError, match=r"^funcdp.optim.\w+: the learning-rate schedule `lr` "
                                         r"returned -0\.1\d* for step 3; a learning rate must "
                                         r"be a non-negative number\."):
        step(grads, state, params)
    nan = make(lambda step: torch.tensor(float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"returned nan for step 1"):
        (nan.step if fused else nan.update)(grads, nan.init(params), params)
    with pytest.raises(ValueError, match=r"`lr` must be a non-negative number or a schedule"):
        make(float("nan"))
