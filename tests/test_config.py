import pytest
import yaml

from marl_sd.config import ConfigError, dump_config, load_config
from marl_sd.model.profiles import load_profile

pytestmark = pytest.mark.unit


def write(tmp_path, tree):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_defaults_and_shipped_configs_load():
    from marl_sd.config import CONFIG_DIR

    assert load_config().scenario.n_users == 8
    for p in CONFIG_DIR.glob("*.yaml"):
        load_config(p)


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, {"scenario": {"n_user": 4}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "scenario.n_user" in str(e.value) and "unknown key" in str(e.value) and str(p) in str(e.value)


def test_ill_typed_and_negative_values(tmp_path):
    with pytest.raises(ConfigError, match="scenario.workload.arrival_rate_per_s"):
        load_config(write(tmp_path, {"scenario": {"workload": {"arrival_rate_per_s": -1}}}))
    with pytest.raises(ConfigError, match="env.horizon"):
        load_config(write(tmp_path, {"env": {"horizon": "long"}}))
    with pytest.raises(ConfigError, match="slot_ms"):
        load_config(overrides=["env.tick_ms=3"])


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config(overrides=["scenario.n_users=5", "reward.team_share=0.2", "name=x"])
    assert cfg.scenario.n_users == 5 and cfg.reward.team_share == 0.2
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg and again.hash() == cfg.hash()
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(overrides=["scenario.bogus=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(overrides=["novalue"])


def test_profile_validation(tmp_path):
    prof = load_profile("llama31_8b_h100")
    assert prof.target.verify.time_ms(1, 5) == pytest.approx(8.38 + 0.023)
    assert prof.target.verify.time_ms(4, 200) == pytest.approx(8.38 + 4 * 0.023 + 0.026 * 40)
    with pytest.raises(ConfigError, match="not found"):
        load_profile("no_such_profile")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntarget: {model: m, verify: {t0_ms: 1}}\ndevices: {}\n")
    with pytest.raises(ConfigError, match="target.verify.c_b_ms"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="not in latency profile"):
        from marl_sd.envs.core import BatchedSimulator

        BatchedSimulator(load_config(overrides=["scenario.devices=[{name: toaster, share: 1}]"]))


def test_bs_height_follows_the_channel_model():
    assert load_config().scenario.channel.h_bs_m == 10.0
    assert load_config(overrides=["scenario.channel.model=uma"]).scenario.channel.h_bs_m == 25.0
    assert load_config(overrides=["scenario.channel.model=uma", "scenario.channel.h_bs_m=30"]).scenario.channel.h_bs_m == 30.0


def test_shipped_configs_found_by_name_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the package's own are used
    for name in ("configs/smoke.yaml", "smoke.yaml", "smoke"):
        assert load_config(name).name == "smoke"
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def test_physics_from_config_files_resolve_into_the_run_config(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"name": "site_a", "scenario": {"n_users": 5, "profile": "llama31_8b_h100"}}))
    low = {"from": "a.yaml", "name": "site_a_low", "scenario": {"n_users": 2}}  # the same sites at another load
    p = write(tmp_path, {"env": {"max_servers": 4}, "train": {"physics": ["a.yaml", {"from": "a.yaml", "weight": 2.0}, low]}})
    cfg = load_config(p)
    assert [(ph.name, ph.scenario.n_users, ph.weight) for ph in cfg.train.physics] == [
        ("site_a", 5, 1.0),
        ("site_a", 5, 2.0),
        ("site_a_low", 2, 1.0),
    ]
    assert cfg.train.physics[2].scenario.profile == "llama31_8b_h100"  # merged over the file's scenario
    part = cfg.with_physics(1)
    assert part.scenario.profile == "llama31_8b_h100" and part.train.physics == [] and part.max_servers == 4
    dump_config(cfg, tmp_path / "run.yaml")  # the resolved config holds the scenarios: it loads anywhere
    assert load_config(tmp_path / "run.yaml").train.physics == cfg.train.physics


@pytest.mark.parametrize(
    ("scenario", "words"),
    [
        ({"profile": "no_such_gpu"}, ["train.physics.0", "no_such_gpu", "not found"]),
        ({"workload": {"arrival_rate_per_s": -1.0}}, ["train.physics.0.scenario.workload.arrival_rate_per_s"]),
        ({"n_servers": 5}, ["train.physics.0", "5 servers exceed env.max_servers (3)"]),
    ],
)
def test_bad_physics_names_the_key_and_the_file(tmp_path, scenario, words):
    p = write(tmp_path, {"train": {"physics": [{"name": "bad", "scenario": scenario}]}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    for w in [*words, str(p)]:
        assert w in str(e.value)
