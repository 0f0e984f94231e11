"""lmforge.fairseq_api.arguments: fairseq-train's command line from the config, the task's part included."""

from lmforge import config
from lmforge.fairseq_api.arguments import model_options, option_args, train_args
from lmforge.training.distributed import Placement

from conftest import TINY_CONFIG as TINY


def value_after(args, flag):
    return args[args.index(flag) + 1]


def test_option_args_flags_and_values():
    assert option_args({"decoder_layers": 2, "share_x": True, "off": False, "none": None, "betas": [0.9, 0.98]}) == [
        "--decoder-layers", "2", "--share-x", "--betas", "(0.9, 0.98)",
    ]


def test_single_process_cpu_has_no_distributed_options():
    args = train_args(config.load(TINY), "/data", "/ckpt")
    assert args[0] == "/data"
    assert "--cpu" in args
    assert "--distributed-world-size" not in args
    assert value_after(args, "--arch") == "transformer_lm"
    assert value_after(args, "--save-dir") == "/ckpt"
    assert value_after(args, "--decoder-layers") == "2"  # model.options reach fairseq
    assert "--share-decoder-input-output-embed" in args


def test_cpu_multi_process_uses_gloo_and_legacy_ddp():
    args = train_args(config.load(TINY), "/d", "/c", Placement(world_size=2, rank=1, device_id=0, cuda=False))
    assert value_after(args, "--distributed-backend") == "gloo"
    assert value_after(args, "--ddp-backend") == "legacy_ddp"
    assert value_after(args, "--distributed-rank") == "1"
    assert value_after(args, "--distributed-init-method") == "env://"
    assert "--distributed-no-spawn" in args


def test_gpu_process_gets_its_local_rank_as_device_id():
    # fairseq ignores LOCAL_RANK; without --device-id every process lands on GPU 0.
    args = train_args(config.load(TINY), "/d", "/c", Placement(world_size=4, rank=3, device_id=1, cuda=True))
    assert value_after(args, "--device-id") == "1"
    assert value_after(args, "--distributed-backend") == "nccl"
    assert "--cpu" not in args
    assert "--ddp-backend" not in args


def test_adaptive_loss_needs_legacy_ddp_on_gpu_too():
    cfg = config.load(TINY, ["model.criterion=adaptive_loss", "model.options.adaptive_softmax_cutoff=1000,3000"])
    args = train_args(cfg, "/d", "/c", Placement(world_size=2, rank=0, cuda=True))
    assert value_after(args, "--ddp-backend") == "legacy_ddp"
    assert value_after(args, "--adaptive-softmax-cutoff") == "1000,3000"


def test_single_gpu_process_still_gets_its_device():
    args = train_args(config.load(TINY), "/d", "/c", Placement(world_size=1, rank=0, device_id=3, cuda=True))
    assert value_after(args, "--device-id") == "3"
    assert "--distributed-world-size" not in args


def test_checkpoint_schedule_patience_and_bmuf():
    cfg = config.load(TINY, [
        "train.save_interval_updates=50", "train.keep_interval_updates=3", "train.keep_last_epochs=2",
        "train.patience=4", "train.bmuf=true", "train.nproc=2", "train.extra_args.global_sync_iter=10",
    ])
    args = train_args(cfg, "/d", "/c", Placement(world_size=2, rank=0))
    assert value_after(args, "--save-interval-updates") == "50"
    assert value_after(args, "--keep-interval-updates") == "3"
    assert value_after(args, "--keep-last-epochs") == "2" and "--no-epoch-checkpoints" not in args
    assert value_after(args, "--patience") == "4"
    assert "--use-bmuf" in args and value_after(args, "--global-sync-iter") == "10"
    plain = train_args(config.load(TINY), "/d", "/c")
    assert "--no-epoch-checkpoints" in plain and "--save-interval-updates" not in plain and "--patience" not in plain


def test_each_precision_has_its_flag():
    for precision, flag in [("fp16", "--fp16"), ("memory_efficient_fp16", "--memory-efficient-fp16"),
                            ("bf16", "--bf16"), ("memory_efficient_bf16", "--memory-efficient-bf16")]:
        args = train_args(config.load(TINY, [f"train.precision={precision}"]), "/d", "/c", Placement(cuda=True))
        assert flag in args, precision
    assert not {"--fp16", "--bf16"} & set(train_args(config.load(TINY), "/d", "/c"))


def test_explicit_ddp_backend_is_kept():
    cfg = config.load(TINY, ["train.extra_args.ddp_backend=no_c10d"])
    args = train_args(cfg, "/d", "/c", Placement(world_size=2, rank=0, cuda=True))
    assert args.count("--ddp-backend") == 1 and value_after(args, "--ddp-backend") == "no_c10d"


def test_extra_args_and_precision():
    cfg = config.load(TINY, ["train.extra_args.label_smoothing=0.1", "train.precision=bf16", "train.warmup_updates=0"])
    args = train_args(cfg, "/d", "/c")
    assert value_after(args, "--label-smoothing") == "0.1"
    assert "--bf16" in args
    assert "--warmup-updates" not in args


def test_the_task_gives_its_arguments_and_the_default_criterion():
    args = train_args(config.load(TINY), "/d", "/c")
    assert value_after(args, "--task") == "language_modeling"
    assert value_after(args, "--tokens-per-sample") == "128" and value_after(args, "--sample-break-mode") == "none"
    assert value_after(args, "--criterion") == "cross_entropy"
    # An empty model.criterion takes the task's default; a named one is kept.
    assert value_after(train_args(config.load(TINY, ["model.criterion="]), "/d", "/c"), "--criterion") == "cross_entropy"
    named = config.load(TINY, ["model.criterion=label_smoothed_cross_entropy"])
    assert value_after(train_args(named, "/d", "/c"), "--criterion") == "label_smoothed_cross_entropy"


def test_input_and_output_widths_follow_decoder_embed_dim():
    """fairseq's --arch transformer_lm leaves both at 512 whatever --decoder-embed-dim says (issue 17)."""
    args = train_args(config.load(TINY), "/d", "/c")
    assert value_after(args, "--decoder-embed-dim") == "64"
    assert value_after(args, "--decoder-input-dim") == value_after(args, "--decoder-output-dim") == "64"
    run_form = train_args(config.load(TINY, ["model.options.decoder_embed_dim=96"]), "/d", "/c")
    assert value_after(run_form, "--decoder-input-dim") == value_after(run_form, "--decoder-output-dim") == "96"
    assert model_options("lstm_lm", {"decoder_embed_dim": 256}) == {"decoder_embed_dim": 256, "decoder_out_embed_dim": 256}
    assert model_options("transformer_lm_gpt", {"decoder_embed_dim": 256}) == {
        "decoder_embed_dim": 256, "decoder_input_dim": 256, "decoder_output_dim": 256}


def test_widths_the_user_sets_are_kept():
    kept = train_args(config.load(TINY, ["model.options.decoder_input_dim=32"]), "/d", "/c")
    assert kept.count("--decoder-input-dim") == 1 and value_after(kept, "--decoder-input-dim") == "32"
    assert value_after(kept, "--decoder-output-dim") == "64"
    in_extra_args = train_args(config.load(TINY, ["train.extra_args.decoder_output_dim=128"]), "/d", "/c")
    assert in_extra_args.count("--decoder-output-dim") == 1 and value_after(in_extra_args, "--decoder-output-dim") == "128"
    # no decoder_embed_dim: the architecture's own width and fairseq's own rule; other models untouched
    assert model_options("transformer_lm_gpt", {"decoder_layers": 2}) == {"decoder_layers": 2}
    assert model_options("fconv_lm", {"decoder_embed_dim": 256}) == {"decoder_embed_dim": 256}


def test_a_tied_adaptive_input_takes_the_softmax_cutoffs():
    """fairseq asserts that tied cutoffs are the same text: the input's follows the softmax's."""
    wiki = ["model.preset=transformer_lm_wiki103", "model.arch=transformer_lm_wiki103", "model.criterion=adaptive_loss"]
    args = train_args(config.load(TINY, [*wiki, "model.options.adaptive_softmax_cutoff=500,1000"]), "/d", "/c")
    assert value_after(args, "--adaptive-input-cutoff") == value_after(args, "--adaptive-softmax-cutoff") == "500,1000"
    as_written = config.load(TINY, [*wiki, "model.options.adaptive_softmax_cutoff=500,1000",
                                    "model.options.adaptive_input_cutoff=(500, 1000)"])
    assert value_after(train_args(as_written, "/d", "/c"), "--adaptive-input-cutoff") == "500,1000"
    untied = config.load(TINY, ["model.options.adaptive_input=true", "model.options.adaptive_input_cutoff=400,1000",
                                "model.options.adaptive_softmax_cutoff=500,1000"])
    assert value_after(train_args(untied, "/d", "/c"), "--adaptive-input-cutoff") == "400,1000"
