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


def test_save_pretrained_and_from_pretrained_use_a_directory(tmp_path):
    c = vps.VPSConfig(rank=3, gamma=0.25, layers=[1])
    written = c.save_pretrained(tmp_path / "run" / "cfg")  # parents are created, as PEFT does
    assert written == tmp_path / "run" / "cfg" / vps.config.CONFIG_NAME and written.name == "vps_config.json"
    assert vps.VPSConfig.from_pretrained(tmp_path / "run" / "cfg") == c
    assert vps.VPSConfig.load(str(tmp_path / "run" / "cfg")) == c  # load reads a directory too
    assert vps.VPSConfig.from_pretrained(written) == c  # and from_pretrained a file


def test_save_to_a_directory_and_missing_files_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"is a directory; VPSConfig.save writes a file.*save_pretrained"):
        vps.VPSConfig().save(tmp_path)
    with pytest.raises(ConfigError, match=r"holds no vps_config.json \(VPSConfig.save_pretrained writes one\)$"):
        vps.VPSConfig.from_pretrained(tmp_path)
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(ConfigError, match="save_pretrained: .*f.json is a file, not a directory"):
        vps.VPSConfig().save_pretrained(tmp_path / "f.json")


def test_a_misspelled_field_suggests_the_nearest_name(tmp_path):
    # the constructor: still a TypeError (Python's kind for an unexpected keyword), now also a ConfigError
    with pytest.raises(ConfigError, match=r"^unknown VPSConfig field 'ranks' \(did you mean 'rank'\?\)$") as info:
        vps.VPSConfig(ranks=4)
    assert isinstance(info.value, TypeError)
    with pytest.raises(ConfigError, match=r"'gama' \(did you mean 'gamma'\?\), 'topK' \(did you mean 'topk'\?\)"):
        vps.VPSConfig().replace(gama=0.1, topK=8)
    # nothing close: the known fields are listed instead
    with pytest.raises(ConfigError, match=r"unknown VPSConfig field 'zzz'; known fields: rank, topk, gamma"):
        vps.VPSConfig.from_dict({"zzz": 1})
    # a JSON file: the message names the file too
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"decode_mod": "dynamic"}))
    with pytest.raises(ConfigError, match=r"cfg.json: unknown VPSConfig field 'decode_mod' \(did you mean "
                                          r"'decode_mode'\?\)$"):
        vps.VPSConfig.load(path)
    assert vps.VPSConfig(2, 16).topk == 16  # positional arguments still work


def test_as_config_reads_configs_paths_and_overrides(tmp_path):
    from vps.config import as_config

    c = vps.VPSConfig(rank=3)
    c.save(tmp_path / "c.json")
    c.save_pretrained(tmp_path / "d")
    assert as_config() == vps.VPSConfig() and as_config(c) is c
    assert as_config(str(tmp_path / "c.json")) == c and as_config(tmp_path / "d") == c
    assert as_config(tmp_path / "c.json", gamma=0.1) == c.replace(gamma=0.1)
    assert as_config(rank=4) == vps.VPSConfig(rank=4)
    with pytest.raises(TypeError, match="^cfg must be a VPSConfig, a path to a VPSConfig JSON file .* got dict$"):
        as_config({"rank": 4})


def test_the_config_flag_reads_a_save_pretrained_directory(tmp_path):
    import argparse

    from vps.commands.common import add_config_arguments, config_from_args

    vps.VPSConfig(rank=3, gamma=0.25).save_pretrained(tmp_path / "cfg")
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    cfg = config_from_args(p.parse_args(["--config", str(tmp_path / "cfg"), "--tau", "0.5"]))
    assert cfg == vps.VPSConfig(rank=3, gamma=0.25, tau=0.5)
