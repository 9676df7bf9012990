"""Contract and math tests of fedbgmd.attacks (fast: tiny tensors, no downloads)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from fedbgmd.attacks import (
    ATTACKS,
    MALFORMED_MODES,
    OMNISCIENT_ATTACKS,
    ClientAttack,
    OmniscientAttack,
    alie_z,
    available_attacks,
    available_omniscient_attacks,
    get_attack,
    get_omniscient_attack,
    register_attack,
    register_builtin_attacks,
)
from fedbgmd.attacks.base import coordinate_stats
from fedbgmd.attacks.minmax import perturbation_direction

D = 64
NUM_CLASSES = 10


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sampler(d: int = D, seed: int = 123) -> Callable[[int], Tensor]:
    """Deterministic ``sample_updates``: the same (m, d) rows for a given m."""

    def sample(m: int) -> Tensor:
        return torch.randn(m, d, generator=gen(seed))

    return sample


def update_vec(d: int = D, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(d, generator=gen(7)).to(dtype)


def batch() -> tuple[Tensor, Tensor]:
    x = torch.rand(8, 1, 6, 6, generator=gen(3))
    y = torch.randint(0, NUM_CLASSES, (8,), generator=gen(4))
    return x, y


def state_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 16)).astype(np.float32),
        "bn.num_batches_tracked": np.array(3, dtype=np.int64),
    }


def names_of_kind(kind: str) -> list[str]:
    return [n for n in available_attacks() if ATTACKS[n].kind == kind]


# ---------------------------------------------------------------------------------------------
# Registry


def test_builtins_registered_and_idempotent() -> None:
    register_builtin_attacks()
    register_builtin_attacks()
    expected = {
        "bit_flip", "gaussian", "sign_flip", "random", "alie", "ipm", "nonfinite", "malformed",
        "feature_noise", "impulse", "backdoor", "label_flip",
    }  # fmt: skip
    assert expected <= set(available_attacks())
    assert {"alie", "ipm", "minmax", "minsum"} <= set(available_omniscient_attacks())
    for name, cls in ATTACKS.items():
        assert cls.name == name and cls.kind in ("update", "data", "message")
        assert cls.__doc__
    for name, ocls in OMNISCIENT_ATTACKS.items():
        assert ocls.name == name and ocls.__doc__


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match="bit_flip"):
        get_attack("no_such_attack")
    with pytest.raises(ValueError, match="minmax"):
        get_omniscient_attack("no_such_attack")


def test_unknown_parameter_named() -> None:
    with pytest.raises(TypeError, match="sigmaa"):
        get_attack("gaussian", sigmaa=1.0)


def test_duplicate_registration_raises() -> None:
    register_builtin_attacks()
    with pytest.raises(ValueError, match="already registered"):
        register_attack("gaussian", ATTACKS["gaussian"])


def test_no_flwr_or_hydra_imports() -> None:
    import pathlib

    import fedbgmd.attacks as pkg

    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        for banned in ("import flwr", "from flwr", "import hydra", "from hydra", "omegaconf"):
            assert banned not in text, f"{path.name} uses {banned}"


@pytest.mark.parametrize(
    ("name", "params", "bad"),
    [
        ("bit_flip", {"scale": 0.0}, "scale"),
        ("bit_flip", {"scale": math.inf}, "scale"),
        ("gaussian", {"sigma": -1.0}, "sigma"),
        ("sign_flip", {"mode": "flip"}, "mode"),
        ("random", {"scale": -2.0}, "scale"),
        ("alie", {"m": 0}, "m"),
        ("alie", {"z": math.nan}, "z"),
        ("alie", {"num_clients": 10}, "num_byzantine"),
        ("alie", {"num_clients": 10, "num_byzantine": 6}, "num_byzantine"),
        ("ipm", {"epsilon": 0.0}, "epsilon"),
        ("ipm", {"m": -1}, "m"),
        ("nonfinite", {"coord_fraction": 1.5}, "coord_fraction"),
        ("nonfinite", {"mode": "zero"}, "mode"),
        ("malformed", {"mode": "bogus"}, "mode"),
        ("malformed", {"dtype": "not_a_dtype"}, "dtype"),
        ("malformed", {"huge_max_elements": 0}, "huge_max_elements"),
        ("feature_noise", {"std": -1.0}, "std"),
        ("impulse", {"p": 1.2}, "p"),
        ("impulse", {"low": 1.0, "high": 0.0}, "low"),
        ("backdoor", {"target": -1}, "target"),
        ("backdoor", {"trigger_size": 0}, "trigger_size"),
    ],
)
def test_bad_params_raise_naming_parameter(name: str, params: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        get_attack(name, **params)


@pytest.mark.parametrize(
    ("name", "params", "bad"),
    [
        ("alie", {"z": math.inf}, "z"),
        ("ipm", {"epsilon": -0.1}, "epsilon"),
        ("minmax", {"perturbation": "abc"}, "perturbation"),
        ("minmax", {"gamma_max": 0.0}, "gamma_max"),
        ("minsum", {"perturbation": "abc"}, "perturbation"),
    ],
)
def test_bad_omniscient_params(name: str, params: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        get_omniscient_attack(name, **params)


# ---------------------------------------------------------------------------------------------
# Contract over every registered attack


def _apply(attack: ClientAttack, seed: int) -> object:
    g = gen(seed)
    if attack.kind == "update":
        return attack.corrupt_update(update_vec(), generator=g, sample_updates=sampler())
    if attack.kind == "data":
        x, y = batch()
        return attack.corrupt_batch(x, y, generator=g, num_classes=NUM_CLASSES)
    return attack.corrupt_arrays(state_arrays(), generator=g)


def _same(a: object, b: object) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))
    if isinstance(a, tuple):
        return isinstance(b, tuple) and all(_same(u, v) for u, v in zip(a, b))
    assert isinstance(a, dict) and isinstance(b, dict)
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )


@pytest.mark.parametrize("name", available_attacks())
def test_client_contract_deterministic(name: str) -> None:
    attack = get_attack(name)
    assert _same(_apply(attack, 5), _apply(attack, 5))


@pytest.mark.parametrize("name", names_of_kind("update"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_update_contract(name: str, dtype: torch.dtype) -> None:
    attack = get_attack(name)
    c = update_vec(dtype=dtype)
    before = c.clone()
    out = attack.corrupt_update(c, generator=gen(1), sample_updates=sampler())
    assert out.shape == c.shape and out.dtype == c.dtype and out.device == c.device
    assert torch.equal(c, before), "input mutated"
    assert out.data_ptr() != c.data_ptr(), "output aliases input"
    if name != "nonfinite":
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", names_of_kind("update"))
def test_update_rejects_non_flat(name: str) -> None:
    with pytest.raises(ValueError, match="update"):
        get_attack(name).corrupt_update(
            torch.zeros(2, 3), generator=gen(), sample_updates=sampler(6)
        )


@pytest.mark.parametrize("name", names_of_kind("data"))
def test_data_contract(name: str) -> None:
    attack = get_attack(name)
    x, y = batch()
    x0, y0 = x.clone(), y.clone()
    xt, yt = attack.corrupt_batch(x, y, generator=gen(1), num_classes=NUM_CLASSES)
    assert torch.equal(x, x0) and torch.equal(y, y0), "input mutated"
    assert xt.shape == x.shape and xt.dtype == x.dtype and xt.device == x.device
    assert yt.shape == y.shape and yt.dtype == y.dtype
    assert int(yt.min()) >= 0 and int(yt.max()) < NUM_CLASSES
    assert xt.data_ptr() != x.data_ptr() and yt.data_ptr() != y.data_ptr()


@pytest.mark.parametrize("name", names_of_kind("message"))
def test_message_contract(name: str) -> None:
    arrays = state_arrays()
    copy = {k: v.copy() for k, v in arrays.items()}
    for seed in range(10):
        out = get_attack(name).corrupt_arrays(arrays, generator=gen(seed))
        assert isinstance(out, dict)
        assert _same(arrays, copy), "input mutated"
        for k, v in out.items():
            assert not (k in arrays and np.shares_memory(v, arrays[k])), "output aliases input"


def _median(x: Tensor) -> Tensor:
    """A stand-in for the server's aggregator (the strategy's hook always passes its own)."""
    return x.median(dim=0).values


@pytest.mark.parametrize("name", available_omniscient_attacks())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("f", [0, 1, 3])
def test_omniscient_contract(name: str, dtype: torch.dtype, f: int) -> None:
    attack = get_omniscient_attack(name)
    assert isinstance(attack, OmniscientAttack)
    honest = torch.randn(8, D, generator=gen(2)).to(dtype)
    before = honest.clone()
    out = attack(honest, f, generator=gen(0), aggregator=_median)
    assert out.shape == (f, D) and out.dtype == dtype and out.device == honest.device
    assert torch.equal(honest, before)
    assert torch.isfinite(out).all()
    assert torch.equal(out, attack(honest, f, generator=gen(0), aggregator=_median))


@pytest.mark.parametrize("name", available_omniscient_attacks())
def test_omniscient_identical_rows_return_them(name: str) -> None:
    honest = torch.ones(5, D).mul(3.0)
    out = get_omniscient_attack(name, **({"z": 1.0} if name == "alie" else {}))(
        honest, 2, generator=gen(), aggregator=_median
    )
    expected = {"ipm": -0.1 * honest[:2]}.get(name, honest[:2])
    torch.testing.assert_close(out, expected)


class _CraftOnly(OmniscientAttack):
    """A user omniscient attack that writes only ``craft`` (records the calls it receives)."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], int, object]] = []

    def craft(
        self,
        honest: Tensor,
        num_byzantine: int,
        generator: torch.Generator,
        aggregator: Callable[[Tensor], Tensor] | None,
    ) -> Tensor:
        self.calls.append((tuple(honest.shape), num_byzantine, aggregator))
        return honest.mean(dim=0).unsqueeze(0).repeat(num_byzantine, 1)


@pytest.mark.parametrize(
    ("honest", "f"),
    [
        (torch.zeros(D), 1),  # not (n_h, d)
        (torch.zeros(0, D), 1),  # no honest row
        (torch.zeros(3, D, dtype=torch.int64), 1),  # not floating
        (torch.zeros(3, D), -1),  # negative num_byzantine
        (torch.zeros(3, D), True),  # bool is not a count
    ],
)
def test_omniscient_subclass_writing_only_craft_is_validated(honest: Tensor, f: int) -> None:
    attack = _CraftOnly()
    with pytest.raises(ValueError) as builtin:
        get_omniscient_attack("ipm")(honest, f, generator=gen())
    with pytest.raises(ValueError) as custom:
        attack(honest, f, generator=gen())
    assert str(custom.value) == str(builtin.value)
    assert attack.calls == [], "craft ran on invalid input"
    # valid input reaches craft unchanged, the aggregator passed through
    out = attack(torch.ones(3, D), 2, generator=gen(), aggregator=_median)
    assert attack.calls == [((3, D), 2, _median)]
    torch.testing.assert_close(out, torch.ones(2, D))


# ---------------------------------------------------------------------------------------------
# Math of each attack


def test_bit_flip_exact() -> None:
    c = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(
        get_attack("bit_flip").corrupt_update(c, generator=gen()), -100 * c, rtol=0, atol=0
    )
    torch.testing.assert_close(
        get_attack("bit_flip", scale=5.0).corrupt_update(c, generator=gen()), -5 * c
    )


def test_gaussian_std_and_mean() -> None:
    c = torch.full((200_000,), 2.0)
    out = get_attack("gaussian").corrupt_update(c, generator=gen())
    noise = out - c
    assert abs(noise.std().item() - 10.0) < 0.1
    assert abs(noise.mean().item()) < 0.1
    out2 = get_attack("gaussian", sigma=0.0).corrupt_update(c, generator=gen())
    assert torch.equal(out2, c)


def test_gaussian_on_gradient_is_lr_times_gradient_noise() -> None:
    """on="gradient" sends η·(g + z) = c + η·z (the seed); on="update" sends c + z (default)."""
    lr, sigma = 0.01, 10.0
    g_true = torch.randn(D, generator=gen(5))
    c = lr * g_true
    z = torch.randn(D, generator=gen(3))  # the attack's noise: the same generator, same draw
    grad = get_attack("gaussian", sigma=sigma, on="gradient")
    out = grad.corrupt_update(c, generator=gen(3), lr=lr)
    torch.testing.assert_close(out, lr * (g_true + sigma * z))
    upd = get_attack("gaussian", sigma=sigma).corrupt_update(c, generator=gen(3), lr=lr)
    torch.testing.assert_close(upd, c + sigma * z)
    assert get_attack("gaussian", sigma=sigma, on="update") == get_attack("gaussian", sigma=sigma)
    with pytest.raises(ValueError, match="lr"):
        grad.corrupt_update(c, generator=gen(3))
    with pytest.raises(ValueError, match="on"):
        get_attack("gaussian", on="weights")


def test_call_corrupt_update_passes_lr_only_where_accepted() -> None:
    from fedbgmd.attacks.base import call_corrupt_update

    seen: list[object] = []

    class Old(ClientAttack):  # a user attack written before corrupt_update took lr
        kind = "update"

        def corrupt_update(self, update, *, generator, sample_updates=None):  # type: ignore[override]
            seen.append("old")
            return -update

    class New(ClientAttack):
        kind = "update"

        def corrupt_update(self, update, **kwargs):  # type: ignore[override]
            seen.append(kwargs.get("lr"))
            return update

    c = update_vec()
    assert torch.equal(
        call_corrupt_update(Old(), c, generator=gen(), sample_updates=None, lr=0.1), -c
    )
    call_corrupt_update(New(), c, generator=gen(), sample_updates=None, lr=0.25)
    out = call_corrupt_update(
        get_attack("gaussian", sigma=2.0, on="gradient"),
        c,
        generator=gen(1),
        sample_updates=None,
        lr=0.5,
    )
    torch.testing.assert_close(out, c + 0.5 * 2.0 * torch.randn(D, generator=gen(1)))
    assert seen == ["old", 0.25]


def test_sign_flip_modes() -> None:
    c = torch.tensor([1.5, -2.0, 0.0])
    assert torch.equal(get_attack("sign_flip").corrupt_update(c, generator=gen()), -c)
    assert torch.equal(
        get_attack("sign_flip", mode="sign").corrupt_update(c, generator=gen()),
        torch.tensor([-1.0, 1.0, 0.0]),
    )


def test_random_ignores_update() -> None:
    a = get_attack("random", scale=3.0)
    out1 = a.corrupt_update(torch.zeros(100_000), generator=gen(9))
    out2 = a.corrupt_update(torch.full((100_000,), 7.0), generator=gen(9))
    assert torch.equal(out1, out2)
    assert abs(out1.std().item() - 3.0) < 0.05


def test_alie_client_formula() -> None:
    c = update_vec()
    extra = sampler()(8)
    rows = torch.cat([c[None], extra])
    mu, sigma = rows.mean(0), rows.std(0, correction=1)
    out = get_attack("alie", z=1.5).corrupt_update(c, generator=gen(), sample_updates=sampler())
    torch.testing.assert_close(out, mu - 1.5 * sigma)
    # default z = 1 without n, f; paper's z with n, f
    out1 = get_attack("alie").corrupt_update(c, generator=gen(), sample_updates=sampler())
    torch.testing.assert_close(out1, mu - sigma)
    a = get_attack("alie", num_clients=10, num_byzantine=2)
    assert a.z_value == pytest.approx(alie_z(10, 2))  # type: ignore[attr-defined]


def test_alie_z_matches_paper() -> None:
    # s = floor(n/2 + 1) − f, z = Φ⁻¹((n − s)/n); paper example n = 50, f = 24 → z ≈ 1.75
    assert alie_z(50, 24) == pytest.approx(1.7507, abs=1e-4)
    assert alie_z(10, 2) == pytest.approx(0.2533, abs=1e-4)  # s = 4, Φ⁻¹(0.6)


def test_alie_ipm_need_sample_updates() -> None:
    for name in ("alie", "ipm"):
        with pytest.raises(ValueError, match="sample_updates"):
            get_attack(name).corrupt_update(update_vec(), generator=gen())


def test_ipm_client_formula() -> None:
    c = update_vec()
    rows = torch.cat([c[None], sampler()(4)])
    out = get_attack("ipm", epsilon=0.5, m=4).corrupt_update(
        c, generator=gen(), sample_updates=sampler()
    )
    torch.testing.assert_close(out, -0.5 * rows.mean(0))


def test_omniscient_alie_ipm_formulas() -> None:
    honest = torch.randn(7, D, generator=gen(11))
    mu, sigma = honest.mean(0), honest.std(0)
    out = get_omniscient_attack("alie")(honest, 3, generator=gen())
    torch.testing.assert_close(out, (mu - alie_z(10, 3) * sigma).expand(3, D))
    out = get_omniscient_attack("alie", z=2.0)(honest, 2, generator=gen())
    torch.testing.assert_close(out, (mu - 2.0 * sigma).expand(2, D))
    out = get_omniscient_attack("ipm", epsilon=0.2)(honest, 2, generator=gen())
    torch.testing.assert_close(out, (-0.2 * mu).expand(2, D))


@pytest.mark.parametrize("mode", ["nan", "inf", "mixed"])
@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_nan_attack(mode: str, fraction: float) -> None:
    c = update_vec(d=400)
    out = get_attack("nonfinite", mode=mode, coord_fraction=fraction).corrupt_update(
        c, generator=gen()
    )
    bad = ~torch.isfinite(out)
    assert int(bad.sum()) == math.ceil(fraction * 400)
    assert torch.equal(out[~bad], c[~bad])
    if mode == "nan":
        assert torch.isnan(out[bad]).all()
    elif mode == "inf":
        assert torch.isinf(out[bad]).all()
    elif fraction == 1.0:
        assert torch.isnan(out).any() and (out == math.inf).any() and (out == -math.inf).any()


@pytest.mark.parametrize("mode", MALFORMED_MODES)
def test_malformed_modes(mode: str) -> None:
    arrays = state_arrays()
    total = sum(v.size for v in arrays.values())
    out = get_attack("malformed", mode=mode, huge_max_elements=5_000).corrupt_arrays(
        arrays, generator=np.random.default_rng(0)
    )
    if mode == "empty":
        assert out == {}
    elif mode == "missing_key":
        assert len(out) == len(arrays) - 1 and set(out) < set(arrays)
    elif mode == "extra_key":
        assert set(out) > set(arrays) and len(out) == len(arrays) + 1
    elif mode == "huge":
        (extra,) = set(out) - set(arrays)
        assert out[extra].size == min(100 * total, 5_000)
    elif mode == "wrong_shape":
        assert set(out) == set(arrays)
        changed = [k for k in arrays if out[k].shape != arrays[k].shape]
        assert len(changed) == 1 and out[changed[0]].size != arrays[changed[0]].size
    elif mode == "wrong_dtype":
        assert set(out) == set(arrays)
        changed = [k for k in arrays if out[k].dtype != arrays[k].dtype]
        assert len(changed) == 1


def test_malformed_huge_default_is_100x() -> None:
    arrays = state_arrays()
    total = sum(v.size for v in arrays.values())
    out = get_attack("malformed", mode="huge").corrupt_arrays(arrays, generator=gen())
    assert out["__huge__"].size == 100 * total


def test_malformed_random_covers_modes_and_torch_generator() -> None:
    attack = get_attack("malformed")
    seen = {attack.resolve_mode(gen(s)) for s in range(60)}  # type: ignore[attr-defined]
    seen |= {attack.resolve_mode(np.random.default_rng(s)) for s in range(60)}  # type: ignore[attr-defined]
    assert seen == set(MALFORMED_MODES)


def test_feature_noise_mean_std() -> None:
    x = torch.zeros(64, 1, 28, 28)
    y = torch.zeros(64, dtype=torch.long)
    xt, yt = get_attack("feature_noise").corrupt_batch(x, y, generator=gen(), num_classes=10)
    assert abs(xt.mean().item() - 100.0) < 0.05 and abs(xt.std().item() - 1.0) < 0.05
    assert torch.equal(yt, y)


def test_impulse_fraction_and_values() -> None:
    x = torch.rand(32, 1, 28, 28, generator=gen(1)) * 0.5 + 0.25
    y = torch.zeros(32, dtype=torch.long)
    xt, _ = get_attack("impulse").corrupt_batch(x, y, generator=gen(), num_classes=10)
    hit = xt != x
    assert abs(hit.float().mean().item() - 0.9) < 0.01
    lo, hi = x.min(), x.max()
    assert ((xt[hit] == lo) | (xt[hit] == hi)).all()
    assert abs((xt[hit] == hi).float().mean().item() - 0.5) < 0.02
    xt2, _ = get_attack("impulse", p=0.5, low=-1.0, high=2.0).corrupt_batch(
        x, y, generator=gen(), num_classes=10
    )
    hit2 = xt2 != x
    assert abs(hit2.float().mean().item() - 0.5) < 0.02
    assert set(xt2[hit2].unique().tolist()) == {-1.0, 2.0}


def test_backdoor_all_target_and_trigger() -> None:
    x, y = batch()
    xt, yt = get_attack("backdoor").corrupt_batch(x, y, generator=gen(), num_classes=10)
    assert (yt == 0).all() and torch.equal(xt, x)
    xt, yt = get_attack("backdoor", target=7, trigger=True, trigger_size=2).corrupt_batch(
        x, y, generator=gen(), num_classes=10
    )
    assert (yt == 7).all()
    assert (xt[..., -2:, -2:] == x.max()).all() and torch.equal(xt[..., :-2, :], x[..., :-2, :])
    with pytest.raises(ValueError, match="target"):
        get_attack("backdoor", target=10).corrupt_batch(x, y, generator=gen(), num_classes=10)


def test_label_flip_mapping() -> None:
    x = torch.zeros(10, 3)
    y = torch.arange(10)
    _, yt = get_attack("label_flip").corrupt_batch(x, y, generator=gen(), num_classes=10)
    assert yt.tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert yt.dtype == y.dtype


# ---------------------------------------------------------------------------------------------
# Min-Max / Min-Sum


def _max_dist(row: Tensor, honest: Tensor) -> float:
    return float(torch.cdist(row[None].double(), honest.double()).max())


@pytest.mark.parametrize("perturbation", ["std", "unit_vec", "sign"])
def test_minmax_constraint_tight(perturbation: str) -> None:
    honest = torch.randn(12, 200, generator=gen(5)) + 0.3
    attack = get_omniscient_attack("minmax", perturbation=perturbation)
    out = attack(honest, 4, generator=gen())
    r = float(torch.cdist(honest.double(), honest.double()).max())
    assert _max_dist(out[0], honest) <= r + 1e-4
    assert (out == out[0]).all()
    gamma = attack.gamma(honest)  # type: ignore[attr-defined]
    assert gamma > 0
    mu = honest.double().mean(0)
    p = perturbation_direction(honest.double(), perturbation)
    torch.testing.assert_close(out[0].double(), mu + gamma * p, rtol=1e-5, atol=1e-5)
    # maximal: a 1% bigger gamma violates the constraint
    assert _max_dist(mu + 1.01 * gamma * p, honest) > r


def test_minmax_gamma_max_caps() -> None:
    honest = torch.randn(6, 30, generator=gen(8))
    full = get_omniscient_attack("minmax").gamma(honest)  # type: ignore[attr-defined]
    capped = get_omniscient_attack("minmax", gamma_max=full / 2).gamma(honest)  # type: ignore[attr-defined]
    assert capped == pytest.approx(full / 2)


def test_minsum_constraint_tight() -> None:
    honest = torch.randn(9, 100, generator=gen(6)).double()
    attack = get_omniscient_attack("minsum")
    out = attack(honest, 2, generator=gen())
    sq = torch.cdist(honest, honest).square()
    bound = float(sq.sum(1).max())
    total = float(torch.cdist(out[:1], honest).square().sum())
    assert total == pytest.approx(bound, rel=1e-9)
    mu, sigma = coordinate_stats(honest)
    bigger = mu - 1.01 * attack.gamma(honest) * sigma  # type: ignore[attr-defined]
    assert float(torch.cdist(bigger[None], honest).square().sum()) > bound


def test_agr_tailored_searches_against_the_given_aggregator() -> None:
    from fedbgmd.attacks.minmax import perturbation_direction

    honest = torch.randn(8, D, generator=gen(3), dtype=torch.float64)
    attack = get_omniscient_attack("agr_tailored", gamma_max=50.0)
    p = perturbation_direction(honest, "std")

    def gamma_of(row: Tensor) -> float:
        return float((row - honest.mean(dim=0)).norm() / p.norm())

    def mean(x: Tensor) -> Tensor:
        return x.mean(dim=0)

    # against the mean the damage grows with gamma: the search must end at the cap
    out = attack(honest, 3, generator=gen(), aggregator=mean)
    assert gamma_of(out[0]) == pytest.approx(50.0)
    # against the coordinate median it never does less damage than no perturbation
    out = attack(honest, 3, generator=gen(), aggregator=_median)
    found = attack.damage(honest, gamma_of(out[0]), 3, _median)
    for g in (0.0, 0.5, 2.0, 50.0):
        assert found >= attack.damage(honest, g, 3, _median) - 1e-9
    with pytest.raises(ValueError, match="aggregator"):
        attack(honest, 3, generator=gen())


def test_omniscient_alie_in_a_round_with_a_byzantine_majority():
    # with clients sampled per round, 3 of 5 sampled rows can be Byzantine although fewer than
    # half are overall; ALIE's z is undefined for f > n/2 and the round used to crash the run
    attack = get_omniscient_attack("alie")
    assert attack.z_for(2, 3) == alie_z(5, 2)  # f capped at ⌊n/2⌋: the formula's largest z
    assert attack.z_for(3, 2) == alie_z(5, 2)
    honest = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    out = attack.craft(honest, 3, torch.Generator().manual_seed(1), None)
    mu, sigma = coordinate_stats(honest)
    torch.testing.assert_close(out, (mu - alie_z(5, 2) * sigma).expand(3, 6))
