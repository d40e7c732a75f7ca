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
