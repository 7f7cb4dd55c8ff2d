"""funcdp.optim against torch.optim, step for step."""

from __future__ import annotations

import math
import types

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
