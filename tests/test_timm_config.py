"""A timm user's configs and habits: YAML values are checked as the command line's are, a timm ``args.yaml`` reads as
timm reads it (``lr`` over ``lr_base``, ``decay_epochs`` for ``--sched step`` only, its no-op keys at their
defaults), our own ``args.yaml`` trains the same run again, the cosine warm-up is timm's curve, ``model_best`` is
the EMA's with ``--model-ema``, ``--device cuda:1`` is that GPU, and a timm flag we lack gets a hint that is right."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from dap_pretrain import distributed
from dap_pretrain.config import DERIVED_SETTINGS, args_yaml, run_config, scaled_lr
from dap_pretrain.lr import lr_at
from dap_pretrain.runner import _best_metric, _restore_best
from dap_pretrain.timm_keys import TIMM_ONLY_DEFAULTS
from dap_pretrain.train import cli, parse_args


def _config(tmp_path, **values) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _parse(tmp_path, *flags, **values):
    return parse_args(["--config", _config(tmp_path, **values), "--output", str(tmp_path / "run"), *flags])


def _refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_yaml_on_and_off_are_the_flags_words_not_the_default(tmp_path):
    (tmp_path / "cfg.yaml").write_text("in_memory: off\n")  # YAML 1.1 reads `off` as False
    args = parse_args(["--config", str(tmp_path / "cfg.yaml"), "--output", "o"])
    assert args.in_memory == "off"
    (tmp_path / "cfg.yaml").write_text("in_memory: on\n")
    assert parse_args(["--config", str(tmp_path / "cfg.yaml"), "--output", "o"]).in_memory == "on"


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"aug": "imagnet"}, "aug: 'imagnet' is invalid: choose from"),
        ({"amp_dtype": "fp16"}, "amp_dtype: 'fp16' is invalid: choose from"),
        ({"dist_bn": "Reduce"}, "dist_bn: 'Reduce' is invalid: choose from"),
        ({"epochs": "ten"}, "epochs: 'ten' is invalid: write an integer"),
        ({"epochs": 2.5}, "epochs: 2.5 is invalid: write an integer"),
        ({"lr": True}, "lr: True is invalid: write a number"),
        ({"scale": 0.5}, "scale: 0.5 is invalid: write a list"),
        ({"amp": "yes"}, "amp: 'yes' is invalid: write true or false"),
    ],
)
def test_a_config_value_the_command_line_would_refuse_is_one_line(tmp_path, capsys, values, words):
    line = _refused(capsys, ["--config", _config(tmp_path, **values), "--output", str(tmp_path / "run")])
    assert words in line and "cfg.yaml" in line
    assert not (tmp_path / "run").exists()


def test_config_numbers_are_converted_as_the_command_line_would(tmp_path):
    args = _parse(tmp_path, lr=1, epochs=4, scale=[0, 1], in_memory_max_mb=10)
    assert isinstance(args.lr, float) and args.scale == [0.0, 1.0] and isinstance(args.in_memory_max_mb, float)


def test_a_timm_args_yaml_reads_as_timm_reads_it(tmp_path, caplog):
    timm_noops = {k: v for k, v in list(TIMM_ONLY_DEFAULTS.items())[:20]}  # timm's keys we lack, at its defaults
    args = _parse(
        tmp_path,
        **timm_noops,
        lr=0.4,
        lr_base=0.1,
        lr_base_size=256,
        lr_base_scale="",  # timm's "unset"
        sched="multistep",
        decay_milestones=[2],
        decay_epochs=90,
        val_interval=3,  # timm's dest; ours is eval_interval
        mixup_prob=1.0,  # mixing keys at their defaults set nothing, so no mixing is needed for them
        mixup_switch_prob=0.5,
        epochs=4,
        dap_warmup=1,
    )
    assert args.lr == 0.4 and args.lr_base is None and args.lr_base_size is None  # timm: lr wins, unscaled
    assert args.lr_base_scale is None and args.eval_interval == 3 and args.decay_epochs is None
    cfg = run_config(args)
    assert cfg.decay_milestones == [2]  # multistep decays at the milestones, as in timm
    notes = " | ".join(cfg.config_notes)
    assert "timm settings at timm's defaults, not used here: " + ", ".join(timm_noops) in notes
    assert "lr 0.4 wins, as in timm" in notes and "decay_epochs 90 is not used under sched multistep" in notes


def test_a_timm_key_at_another_value_is_refused_by_name(tmp_path, capsys):
    line = _refused(capsys, ["--config", _config(tmp_path, bce_loss=True, epoch_repeats=0.0), "--output", "o"])
    assert "unknown keys ['bce_loss']" in line and "accepted only at timm's defaults" in line


def test_the_command_line_still_wins_over_a_configs_lr(tmp_path):
    args = _parse(tmp_path, "--lr-base", "0.2", lr=0.4)
    assert args.lr_base == 0.2  # the config's lr gives way to --lr-base typed now
    args = _parse(tmp_path, lr=0.4, lr_base_size=512)  # our own --lr-base-size, without timm's lr_base
    assert args.lr == 0.4 and args.lr_base_size == 512


def test_decay_epochs_is_the_step_schedules_alone(tmp_path, capsys):
    line = _refused(capsys, ["--sched", "multistep", "--decay-epochs", "3", "--output", "o"])
    assert "--decay-epochs sets --sched step's interval, but --sched is multistep" in line
    line = _refused(capsys, ["--decay-epochs", "3", "--decay-milestones", "2", "--output", "o"])
    assert "give one of --decay-milestones and --decay-epochs" in line
    args = _parse(tmp_path, "--decay-milestones", "5", decay_epochs=3, epochs=10, dap_warmup=1)
    assert run_config(args).decay_milestones == [5]  # typed milestones replace the config's decay_epochs
    args = _parse(tmp_path, "--decay-epochs", "3", decay_milestones=[5], epochs=10, dap_warmup=1)
    assert run_config(args).decay_milestones == [3, 6, 9]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--epochs-scale", "0.6", "--decay-milestones", "3", "--warmup-epochs", "1"],
        ["--decay-epochs", "2", "--lr-base", "0.2", "--fixed-subset", "0.5"],
    ],
)
def test_our_args_yaml_as_a_config_resolves_to_the_same_run(tmp_path, extra):
    def resolved(argv):  # as the runner resolves them before it writes args.yaml (the LR scaled for 1 process)
        return scaled_lr(run_config(parse_args([*argv, "--output", "run1"])), world=1)[0]

    first = resolved(["--epochs", "5", "--dap-warmup", "1", *extra])
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump(args_yaml(first), sort_keys=False))
    again = resolved(["--config", str(path)])

    def setting(cfg):
        return {k: v for k, v in cfg.to_dict().items() if k not in ("config", "config_notes")}

    assert setting(again) == setting(first)
    assert not set(DERIVED_SETTINGS) & set(yaml.safe_load(path.read_text()))


def test_cosine_with_warmup_follows_timms_scheduler(capsys):
    from timm.scheduler import create_scheduler_v2

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    timm_sched, epochs = create_scheduler_v2(opt, sched="cosine", num_epochs=100, warmup_epochs=5, warmup_lr=1e-4,
                                             min_lr=1e-5)  # fmt: skip
    assert epochs == 100
    for epoch in (0, 3, 5, 6, 30, 50, 75, 99):
        ours = lr_at(float(epoch), base_lr=0.1, sched="cosine", epochs=100, warmup_epochs=5, warmup_lr=1e-4,
                     min_lr=1e-5)  # fmt: skip
        assert ours == pytest.approx(timm_sched._get_lr(epoch)[0], rel=1e-9), epoch
    assert "the warm-up replaces the start" in _refused(capsys, ["--warmup-prefix", "--output", "o"])


def test_model_best_is_the_emas_when_there_is_one(tmp_path):
    assert _best_metric({"eval_top1": 60.0, "ema_top1": 55.0}) == 55.0
    assert _best_metric({"eval_top1": 60.0}) == 60.0 and _best_metric({"eval_top1": None}) is None
    history = [
        {"epoch": 1, "eval_top1": 50.0, "ema_top1": 40.0},
        {"epoch": 2, "eval_top1": 45.0, "ema_top1": 48.0},  # the raw model fell, the EMA rose: timm keeps epoch 2
    ]
    (tmp_path / "model_best.pth.tar").write_bytes(b"kept")
    assert _restore_best({"epoch": 2}, tmp_path, history) == 48.0


def test_an_empty_output_is_refused(capsys):
    assert "--output is empty" in _refused(capsys, ["--output", ""])


def test_timm_hints_name_the_right_flag(capsys):
    assert run_config(parse_args(["--dr", "0.5", "--output", "o"])).decay_rate == 0.5  # timm's alias
    line = _refused(capsys, ["--gp", "avg", "--output", "o"])
    assert "--model-kwargs global_pool=avg" in line and "--gpu-decode" not in line and "positional" not in line
    line = _refused(capsys, ["/data/imagenet", "--output", "o"])
    assert "timm's positional data folder: pass --data-dir /data/imagenet" in line
    assert "--drop-path" in _refused(capsys, ["--drop-connect", "0.1"])
    assert "did you mean" not in _refused(capsys, ["--color-jitter-prob", "0.8"])


class _FakeCuda:
    def __init__(self, count: int):
        self.count, self.set = count, []

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.set.append(torch.device(d)))


def test_device_cuda_index_is_that_gpu_in_one_process(monkeypatch, capsys):
    fake = _FakeCuda(2)
    fake.install(monkeypatch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed.init_distributed("cuda:1")[0] == torch.device("cuda", 1)
    assert distributed.init_distributed("cuda")[0] == torch.device("cuda", 0)
    assert fake.set == [torch.device("cuda", 1), torch.device("cuda", 0)]
    with pytest.raises(distributed.UsageError, match="has 2 CUDA device"):
        distributed.init_distributed("cuda:2")


def test_under_torchrun_each_process_takes_its_local_rank(monkeypatch, caplog):
    _FakeCuda(4).install(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # no process group in a unit test
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 3)
    with caplog.at_level(logging.WARNING):
        assert distributed.init_distributed("cuda:0")[0] == torch.device("cuda", 3)
    assert "each process takes the GPU of its LOCAL_RANK, here cuda:3" in caplog.text


def test_an_inherited_lr_gives_way_to_the_childs_lr_base(tmp_path):
    """The "lr wins" rule is for one file holding both (a timm args.yaml); a child config's lr_base still replaces
    the lr its _base_ sets, and a child's lr replaces its base's lr_base."""
    (tmp_path / "base.yaml").write_text("lr: 0.1\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nlr_base: 0.2\nlr_base_size: 512\n")
    args = parse_args(["--config", str(tmp_path / "child.yaml"), "--output", "o"])
    assert args.lr_base == 0.2 and args.lr_base_size == 512
    (tmp_path / "base.yaml").write_text("lr_base: 0.2\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nlr: 0.3\n")
    args = parse_args(["--config", str(tmp_path / "child.yaml"), "--output", "o"])
    assert args.lr == 0.3 and args.lr_base is None


def test_a_typed_lr_is_not_rescaled_by_a_timm_configs_base_size(tmp_path):
    args = _parse(tmp_path, "--lr", "0.4", "-b", "128", lr_base=0.1, lr_base_size=256)
    cfg = scaled_lr(run_config(args), world=1)[0]
    assert cfg.lr == 0.4  # timm: --lr as given; lr_base_size belongs to lr_base


def test_yaml_numbers_written_as_text_are_numbers(tmp_path):
    (tmp_path / "cfg.yaml").write_text("weight_decay: 5e-4\nlr: 1e-3\nepochs: '5'\nval_split: 2017\n")
    args = parse_args(["--config", str(tmp_path / "cfg.yaml"), "--output", "o"])  # YAML 1.1 reads 5e-4 as text
    assert args.weight_decay == 5e-4 and args.lr == 1e-3 and args.epochs == 5 and args.val_split == "2017"


@pytest.mark.parametrize(
    ("values", "words"),
    [({"mean": [0.5, 0.5]}, "write a list of 3"), ({"epochs": None}, "epochs: None is invalid: give a value")],
)
def test_a_config_value_of_the_wrong_shape_is_one_line(tmp_path, capsys, values, words):
    assert words in _refused(capsys, ["--config", _config(tmp_path, **values), "--output", "o"])


def test_args_yaml_starts_a_new_run_and_an_old_one_reads_or_says_what_to_change(tmp_path, capsys):
    cfg = run_config(parse_args(["--output", "o", "--overwrite", "--resume", str(tmp_path / "last.pth.tar")]))
    assert not {"resume", "overwrite"} & set(args_yaml(cfg))
    old = dict(args_yaml(run_config(parse_args(["--output", "o", "--epochs", "6", "--dap-warmup", "1"]))))
    old.update(baseline_epochs=6, resume="x/last.pth.tar", overwrite=True)  # an args.yaml from before 2026-11-27
    args = _parse(tmp_path, **old)
    assert args.resume == "" and args.overwrite is False and args.epochs == 6
    old.update(epochs=4, epochs_scale=0.6, baseline_epochs=6)
    line = _refused(capsys, ["--config", _config(tmp_path, **old)])
    assert "args.yaml from before 2026-11-27" in line and "set epochs: 6" in line


def test_surplus_numbers_are_not_taken_for_timms_data_folder(capsys):
    assert "positional" not in _refused(capsys, ["--input-size", "3", "224", "224", "--output", "o"])
    assert "positional" not in _refused(capsys, ["--lr", "0.1", "0.2", "--output", "o"])


def test_timms_lr_null_takes_the_lr_from_lr_base(tmp_path, capsys):
    """timm's args.yaml holds lr: null unless --lr was typed: the LR then comes from lr_base, as in timm."""
    args = _parse(tmp_path, "-b", "128", lr=None, lr_base=0.1, lr_base_size=256)
    assert scaled_lr(run_config(args), world=1)[0].lr == pytest.approx(0.05)
    args = _parse(tmp_path, "--lr", "0.4", lr=None, lr_base=0.1, lr_base_size=256)
    assert scaled_lr(run_config(args), world=1)[0].lr == 0.4
    line = _refused(capsys, ["--config", _config(tmp_path, lr=None), "--output", "o"])
    assert "lr: null and no lr_base" in line


@pytest.mark.parametrize(
    ("values", "words"),
    [({"output": None}, "output: None is invalid: give a value"), ({"epochs": float("inf")}, "write an integer"),
     ({"lr": float("nan")}, "write a number")],
)  # fmt: skip
def test_null_and_non_finite_config_values_are_one_line(tmp_path, capsys, values, words):
    assert words in _refused(capsys, ["--config", _config(tmp_path, **values)])


def test_a_later_base_in_a_list_overrides_an_earlier_ones_lr(tmp_path):
    """`_base_: [a, b]`: b is merged after a, so b's lr_base replaces a's lr (one file holding both: timm's rule)."""
    (tmp_path / "a.yaml").write_text("lr: 0.1\n")
    (tmp_path / "b.yaml").write_text("lr_base: 0.2\n")
    (tmp_path / "c.yaml").write_text("_base_: [a.yaml, b.yaml]\n")
    assert parse_args(["--config", str(tmp_path / "c.yaml"), "--output", "o"]).lr_base == 0.2
    (tmp_path / "c.yaml").write_text("_base_: [b.yaml, a.yaml]\n")
    args = parse_args(["--config", str(tmp_path / "c.yaml"), "--output", "o"])
    assert args.lr == 0.1 and args.lr_base is None
