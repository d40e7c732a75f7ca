"""Typed config: presets, overrides, clear errors naming the key."""

import pytest
from helpers_train import run_train

from vssl_fast.config import PRESETS, ConfigError, load_config


def test_presets_follow_the_recipes():
    c10 = load_config(["--preset", "cifar10"])
    assert (c10.optim.lr, c10.optim.weight_decay, c10.train.batch_size, c10.train.epochs) == (1.0, 1e-5, 256, 1000)
    assert c10.model.cifar_stem and c10.method.pred_hidden_dim == 4096 and c10.method.method == "vssl"
    inet = load_config(["--preset", "imagenet100"])
    assert (inet.optim.lr, inet.optim.weight_decay, inet.train.epochs, inet.method.pred_hidden_dim) == (0.5, 1e-6, 400, 8192)
    assert not inet.model.cifar_stem and inet.data.crop_size == 224
    assert load_config(["--preset=cifar100"]).data.dataset == "cifar100"
    assert set(PRESETS) == {"cifar10", "cifar100", "imagenet100", "smoke"}


def test_overrides_are_typed():
    c = load_config(["--preset", "smoke", "--optim.lr=2.5", "--method.method=byol", "--method.abs_noise=false",
                     "--eval.knn_k=10,50", "--eval.knn_t=0.1,0.2", "--run-dir", "x/y", "--method.logvar_clamp=-5,5"])
    assert c.optim.lr == 2.5 and c.method.method == "byol" and c.method.abs_noise is False
    assert c.eval.knn_k == (10, 50) and c.run_dir == "x/y" and c.method.logvar_clamp == (-5, 5)


@pytest.mark.parametrize("argv,msg", [
    (["--optim.lrr=1"], r"unknown config key 'optim.lrr'"),
    (["--optimizer.lr=1"], r"unknown config section 'optimizer'"),
    (["--train.batch_size=big"], r"train.batch_size: expected an integer"),
    (["--method.divergence=l2"], r"method.divergence: invalid value 'l2'"),
    (["--data.dataset=mnist"], r"data.dataset: invalid value 'mnist'"),
    (["--preset", "imagenet1k"], r"unknown preset 'imagenet1k'"),
    (["--ckpt.keep=1"], r"ckpt.keep: keep at least 2"),
    (["--method.divergence=gaussian"], r"method.var_param: divergence='gaussian' needs a positive variance"),
    (["stray"], r"unexpected argument 'stray'"),
])
def test_bad_config_is_an_error_naming_the_key(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(argv)


def test_train_py_rejects_unknown_key_with_exit_2(tmp_path):
    r = run_train(["--preset", "smoke", "--optim.warmup=3", f"--run-dir={tmp_path / 'run'}"], timeout=120)
    assert r.returncode == 2
    assert "unknown config key 'optim.warmup'" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing was created


# ----------------------------------------------------------------------------- --help
def _help() -> str:
    r = run_train(["--help"], timeout=120)
    assert r.returncode == 0, r.stderr
    short = run_train(["-h"], timeout=120)
    assert short.returncode == 0 and short.stdout == r.stdout, short.stderr
    return r.stdout


def test_help_lists_every_setting_with_type_default_choices_and_description():
    """train.py --help failed with 'option --help needs a value' (exit 2)."""
    from vssl_fast.config import Config, _sections
    from vssl_fast.typed import field_types, show_value, type_name

    text = _help()
    lines = text.splitlines()
    assert lines[0].startswith("usage: python train.py")
    assert "torchrun --standalone --nproc_per_node=2 train.py" in text  # train.py's docstring: the launch commands
    base = Config()
    for sec, section in _sections(base):
        header = lines.index(next(x for x in lines if x.startswith(f"{sec}:")))
        for name, tp in field_types(section).items():
            entry = f"  --{sec}.{name} {type_name(tp)}  (default: {show_value(getattr(section, name))})"
            assert entry in lines, f"--help has no line {entry!r}"
            i = lines.index(entry)
            assert i > header, f"--{sec}.{name} is listed outside its section {sec}"
            assert lines[i + 1].startswith("      ") and len(lines[i + 1].strip()) > 3, f"--{sec}.{name}: no description"
    for flag in ("--config FILE", "--preset NAME", "--run-dir DIR", "--resume VALUE", "-h, --help"):
        assert any(x.startswith(f"  {flag}") for x in lines), flag
    assert "{resnet18,resnet50}" in text and "{1,-1}" in text  # choices come from the Literal types
    presets = text[text.index("presets (--preset NAME)"):]
    for name in PRESETS:
        assert f"\n  {name} " in presets
    # what a preset sets, as key=value over the defaults (derived, so it cannot drift)
    assert "optim.lr=0.5" in presets and "data.crop_size=224" in presets and "train.batch_size=64" in presets


def test_choices_are_the_types_for_parser_and_validation():
    """Every Literal setting: the parser and the validation reject a value outside it with one message."""
    from vssl_fast.config import Config, _sections
    from vssl_fast.typed import choices_of, field_types

    seen = 0
    for sec, section in _sections(Config()):
        for name, tp in field_types(section).items():
            allowed = choices_of(tp)
            if allowed is None:
                continue
            seen += 1
            with pytest.raises(ConfigError, match=rf"^{sec}.{name}: invalid value 'bogus'; choose one of"):
                load_config([f"--{sec}.{name}=bogus"])
            cfg = load_config([])
            setattr(getattr(cfg, sec), name, "bogus")  # set from Python: the same check at validate()
            with pytest.raises(ValueError, match=rf"{sec}.{name}: invalid value 'bogus'"):
                cfg.validate()
    assert seen >= 20


# ----------------------------------------------------------------------------- --config FILE
def _write(path, obj):
    import json

    path.write_text(json.dumps(obj))
    return str(path)


def test_config_file_partial_with_overrides_on_top(tmp_path):
    f = _write(tmp_path / "part.json", {"preset": "smoke", "optim": {"lr": 2, "name": "lamb"},
                                        "eval": {"knn_k": [5], "knn_t": [0.5]}})
    c = load_config(["--config", f, "--optim.lr=3"])
    smoke = PRESETS["smoke"]()
    assert c.preset == "smoke" and c.train.batch_size == smoke.train.batch_size  # the file's preset is the base
    assert c.optim.lr == 3.0 and isinstance(c.optim.lr, float) and c.optim.name == "lamb"  # command line over file
    assert c.eval.knn_k == (5,) and c.eval.knn_t == (0.5,)
    assert load_config([f"--config={f}", "--preset", "cifar100"]).data.dataset == "cifar100"  # --preset wins


def test_a_runs_config_json_reruns_it_exactly(tmp_path):
    import json

    cfg = load_config(["--preset", "smoke", "--optim.lr=0.7", "--method.abs_noise=false", "--eval.knn_t=0.05,0.2",
                       "--model.sync_batchnorm=true", "--data.path", str(tmp_path), "--run-dir", str(tmp_path / "a")])
    f = tmp_path / "config.json"
    f.write_text(cfg.to_json())  # what rundir.write_config writes
    again = load_config(["--config", str(f), "--run-dir", str(tmp_path / "b")])
    a, b = cfg.to_dict(), again.to_dict()
    assert b.pop("run_dir") == str(tmp_path / "b") and a.pop("run_dir") == str(tmp_path / "a")
    assert a == b
    assert json.loads(again.to_json()) == {**json.loads(f.read_text()), "run_dir": str(tmp_path / "b")}


@pytest.mark.parametrize("content,msg", [
    ({"optim": {"lrr": 1}}, r"part.json: unknown config key 'optim.lrr' \(in optim\)"),
    ({"optimizer": {"lr": 1}}, r"part.json: unknown config key 'optimizer' \(top level\)"),
    ({"optim": 3}, r"part.json: 'optim' is a section"),
    ({"train": {"batch_size": 2.5}}, r"part.json: train.batch_size: expected an integer, got 2.5"),
    ({"data": {"dataset": "mnist"}}, r"part.json: data.dataset: invalid value 'mnist'"),
    ({"log": {"progress": "maybe"}}, r"part.json: log.progress: expected a boolean"),
    ({"preset": "imagenet1k"}, r"part.json: unknown preset 'imagenet1k'"),
    ([1, 2], r"part.json: expected a mapping"),
])
def test_bad_config_file_names_the_file_and_key(tmp_path, content, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(["--config", _write(tmp_path / "part.json", content)])


def test_config_file_errors_exit_2_naming_file_and_key(tmp_path):
    f = _write(tmp_path / "bad.json", {"optim": {"warmup": 3}})
    r = run_train(["--config", f, f"--run-dir={tmp_path / 'run'}"], timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"config error: {f}: unknown config key 'optim.warmup' (in optim); valid keys: "
                                "['classifier_lr', 'eta', 'impl', 'lr', 'min_lr', 'momentum', 'name', 'tau_base', "
                                "'tau_final', 'warmup_epochs', 'warmup_start_lr', 'weight_decay']")
    assert not (tmp_path / "run").exists()
    (tmp_path / "broken.json").write_text('{"optim": {"lr": }')
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON: .* line 1"):
        load_config(["--config", str(tmp_path / "broken.json")])
    with pytest.raises(ConfigError, match=r"--config .*missing.json: no such file"):
        load_config(["--config", str(tmp_path / "missing.json")])


def test_yaml_config_file(tmp_path):
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (the [yaml] extra); JSON configs still work")
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"preset": "smoke", "optim": {"lr": 0.25}, "eval": {"knn_k": [7, 9], "knn_t": [0.1, 0.2]}})
                 + "train:\n  max_steps: 3\n  precision: fp32\noptim_extra: 1\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown config key 'optim_extra'"):
        load_config(["--config", str(f)])
    f.write_text(f.read_text().replace("optim_extra: 1\n", "") + "data:\n  max_bad_fraction: 1e-3\n")  # YAML: a string
    c = load_config(["--config", str(f), "--train.max_steps=4"])
    assert (c.preset, c.optim.lr, c.eval.knn_k, c.train.max_steps, c.data.max_bad_fraction) == ("smoke", 0.25, (7, 9), 4, 1e-3)


def test_yaml_without_pyyaml_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "yaml", None)  # as on the GPU machine: import yaml raises ImportError
    f = tmp_path / "run.yml"
    f.write_text("optim:\n  lr: 2\n")
    with pytest.raises(ConfigError, match=r"--config .*run.yml: reading YAML needs PyYAML, which is not installed"):
        load_config(["--config", str(f)])
