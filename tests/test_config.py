import json

import pytest

import vps
from vps.config import ConfigError

BAD = [
    ("rank", {"rank": 0}, "rank"),
    ("topk_lt_rank", {"rank": 4, "topk": 2}, "topk"),
    ("gamma_negative", {"gamma": -0.1}, "gamma"),
    ("gamma_nan", {"gamma": float("nan")}, "gamma"),
    ("tau_zero", {"tau": 0.0}, "tau"),
    ("order", {"order": 3}, "order"),
    ("builder", {"builder": "magic"}, "builder"),
    ("scope", {"scope": "token"}, "scope"),
    ("decode_mode", {"decode_mode": "sometimes"}, "decode_mode"),
    ("alpha", {"alpha": 0}, "alpha"),
    ("bool_flag", {"qk_coupling": "yes"}, "qk_coupling"),
    ("rank_bounds_order", {"rank_bounds": (3, 1)}, "rank_bounds"),
    ("gamma_bounds_shape", {"gamma_bounds": (0.1,)}, "gamma_bounds"),
    ("layers", {"layers": [-1]}, "layers"),
    ("targets_empty", {"target_modules": []}, "target_modules"),
]


@pytest.mark.parametrize("name,kwargs,field", BAD, ids=[b[0] for b in BAD])
def test_bad_values_name_the_field(name, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        vps.VPSConfig(**kwargs)


def test_seed_defaults():
    c = vps.VPSConfig()
    assert (c.rank, c.topk, c.gamma, c.tau, c.builder, c.order) == (2, 32, 0.5, 0.8, "hybrid", 1)
    assert c.qk_coupling and c.lbfgs_enabled and c.adaptive_rank and c.adaptive_gamma
    assert c.alpha == 1e-3 and c.scope == "sequence" and c.decode_mode == "frozen"


def test_json_round_trip_is_stamped(tmp_path):
    c = vps.VPSConfig(rank=3, topk=16, gamma_bounds=(0.1, 0.4), target_modules=["q_proj"], layers=[0, 2])
    path = tmp_path / "cfg.json"
    c.save(path)
    assert json.loads(path.read_text())["version"] == vps.__version__
    assert vps.VPSConfig.load(path) == c


def test_unknown_field_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="ranks"):
        vps.VPSConfig.from_dict({"ranks": 2})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        vps.VPSConfig.load(bad)


def test_resolved_bounds_follow_flags():
    c = vps.VPSConfig(adaptive_rank=False, adaptive_gamma=False)
    assert c.resolved_rank_bounds == (2, 2) and c.resolved_gamma_bounds == (0.5, 0.5)
    c = vps.VPSConfig()
    assert c.resolved_rank_bounds == (1, 2) and c.resolved_gamma_bounds == (0.0, 0.5)
