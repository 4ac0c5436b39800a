"""The GPU paths, checked on a CPU (docs/gpu.md): the audits' reproductions of
what Paddle does on a GPU, and every option decision with the device facts injected.

O2 is reproduced the way ``paddle.amp.decorate(level='O2', save_dtype='float32')`` does it
once the place is a GPU: ``amp_initialize`` casts the weights, a ``StateDictHook`` on
every sublayer makes ``state_dict()`` return fp32 copies.
"""
import os

import numpy as np
import paddle
import pytest

import check_env
import checkpoint
import config
import data
import device as devices
import engine
import errors
import finetune
import models
import predictors
import train_net
from helpers import make_cifar_archive

P3, P26 = "3.3.1", "2.6.2"


def as_o2(model, dtype="float16"):
    """What decorate(level='O2', save_dtype='float32') does to ``model`` on a GPU."""
    from paddle.amp.auto_cast import StateDictHook, amp_initialize
    amp_initialize(models=[model], dtype=dtype, excluded_layers=None)
    for layer in model.sublayers(include_self=True):
        layer.register_state_dict_hook(StateDictHook("float32"))
    return model


def cfg_of(**values):
    return config.make_config(values)


# ------------------------------------------------------------- audit #1, #3: O2 evaluation
def test_o2_model_is_evaluated_from_an_fp32_copy():
    paddle.seed(0)
    reference = models.resnet20()
    o2 = as_o2(models.resnet20())
    # the same weights, cast into the O2 tensors (through the tensors themselves: the
    # state dict holds the hook's fp32 copies)
    params = dict(o2.named_parameters())
    params.update(dict(o2.named_buffers()))
    for k, v in reference.state_dict().items():
        params[k].set_value(v.astype(params[k].dtype))
    x = paddle.rand([4, 3, 32, 32])
    with pytest.raises(Exception):  # what evaluate(model) did at 787e1f8: fp32 images into fp16 weights
        o2.eval()
        o2(x)
    fresh = train_net.model_for_eval(o2, cfg_of(model="resnet20", amp=True, amp_level="O2"), 10)
    assert fresh is not o2 and fresh.conv1.weight.dtype == paddle.float32
    reference.eval()
    fresh.eval()
    np.testing.assert_allclose(fresh(x).numpy(), reference(x).numpy(), rtol=1e-2, atol=1e-2)  # fp16-rounded weights
    assert train_net.model_for_eval(reference, cfg_of(model="resnet20"), 10) is reference  # fp32 runs: no copy


@pytest.mark.parametrize("device,amp,amp_eval,enabled", [("gpu:0", True, True, True), ("gpu:0", True, False, False),
                                                         ("gpu:0", False, True, False), ("cpu", True, True, False)])
def test_amp_eval_evaluates_under_auto_cast_on_a_gpu_only(monkeypatch, device, amp, amp_eval, enabled):
    """--amp-eval on a GPU: evaluation under auto_cast O1 in --amp-dtype (the CPU's bf16
    evaluation is our kernels' entry, set by choose_kernels); without it, or without --amp, fp32."""
    calls = []
    monkeypatch.setattr(paddle, "get_device", lambda: device)
    monkeypatch.setattr(paddle.amp, "auto_cast", lambda **kw: calls.append(kw))
    cfg = config.TrainConfig(amp=amp, amp_eval=amp_eval, amp_dtype="bfloat16")
    train_net.eval_precision(cfg)
    assert calls == [dict(enable=enabled, dtype="bfloat16", level="O1")]


def test_load_weights_cannot_reach_an_o2_model_so_best_is_a_fresh_model(tmp_path):
    """Audit #3: load_weights writes into the hook's fp32 copies; the best checkpoint is
    therefore evaluated with a fresh model built from it (checkpoint.model_from_checkpoint)."""
    paddle.seed(0)
    o2 = as_o2(models.resnet20())
    before = o2.conv1.weight.astype("float32").numpy().copy()
    models.load_weights(o2, {k: np.full(v.shape, 0.5, "float32") for k, v in o2.state_dict().items()})
    np.testing.assert_array_equal(o2.conv1.weight.astype("float32").numpy(), before)  # Paddle's mechanism

    archive = make_cifar_archive(tmp_path / "c.tar.gz", n_train=50, n_test=20)
    cfg = config.make_config(dict(model="resnet20", data_file=archive, val_size=10, num_workers=0,
                                  output_dir=str(tmp_path / "run"), amp=True, amp_level="O2"))
    os.makedirs(cfg.output_dir)
    paddle.seed(1)
    best = models.resnet20()
    state = dict(model=best.state_dict(), config=config.to_dict(cfg), class_names=list(data.CIFAR10_CLASSES))
    checkpoint.save(os.path.join(cfg.output_dir, checkpoint.BEST), state)
    test = data.load(cfg).splits["test"]
    run = checkpoint.RunState(history=[dict(epoch=2, iteration=4, train_loss=1.0, train_acc=0.1, val_acc=0.2,
                                            epoch_time_s=1.0)], best=dict(val_acc=0.3, epoch=1))
    final_model = train_net.model_for_eval(o2, cfg, 10)
    result = engine.final_report(cfg, final_model, test, 10, run)
    expected = engine.evaluate(best, data.eval_loader(test, 256, 0), 10)["top1"]
    final = engine.evaluate(final_model, data.eval_loader(test, 256, 0), 10)["top1"]
    assert result["best_test_acc"] == expected and result["final_test_acc"] == final


# ----------------------------------------------------------------- audit #2, #11: fp32 loss
def test_loss_is_fp32_and_its_epoch_sum_stays_finite():
    logits = paddle.to_tensor(np.random.RandomState(0).randn(128, 10).astype("float16"))
    labels = paddle.to_tensor(np.random.RandomState(1).randint(0, 10, 128).astype("int64"))
    loss = engine.loss_of(logits, labels)
    assert loss.dtype == paddle.float32
    total = 0.0
    for _ in range(400):  # a 51k-image epoch at loss ~2.3: an fp16 sum passes 65504
        total = total + loss.detach() * 128
    assert np.isfinite(total.item()) and total.item() == pytest.approx(400 * 128 * loss.item(), rel=1e-5)
    scaled = loss * paddle.to_tensor([65536.0])  # GradScaler's first scale: finite in fp32
    assert np.isfinite(scaled.item())


# ----------------------------------------------------------------------- audit #4: SyncBN
def test_sync_bn_leaves_frozen_batchnorm_frozen():
    model = models.resnet18(num_classes=5, stem="cifar")
    finetune.apply_strategy(model, "last")
    weight = model.layer4[0].bn1.weight
    train_net.convert_sync_bn(model)
    assert type(model.bn1).__name__ == "BatchNormAct2D" and model.bn1._use_global_stats
    assert type(model.layer3[0].bn1).__name__ == "BatchNormAct2D" and model.layer3[0].bn1._use_global_stats
    assert type(model.layer4[0].bn1).__name__ == "SyncBatchNorm"
    assert model.layer4[0].bn1.weight is weight  # the optimizer still holds the same tensors
    assert type(model.layer4[0].downsample[1]).__name__ == "SyncBatchNorm"


# ---------------------------------------------------------------------- audit #5: RNG
def test_rng_state_is_the_cpu_generator_and_restores_with_other_device_counts():
    state = checkpoint.rng_state()
    assert "paddle" not in state  # one CPU state, not a list of states of unknown devices
    checkpoint.set_rng_state(state)
    a = paddle.rand([3]).numpy()
    checkpoint.set_rng_state(state)
    np.testing.assert_array_equal(paddle.rand([3]).numpy(), a)
    # a checkpoint from before 2026-12: a list of generator states, one per visible GPU or a
    # single GPU's, which 2026-11 wrote into the CPU generator (audit 2, N15): left alone
    paddle.rand([3])
    current = checkpoint.rng_state()["paddle_cpu"]
    next_draw = paddle.rand([3]).numpy()
    for states in ([state["paddle_cpu"]] * 2, [state["paddle_cpu"]]):  # 787e1f8: ValueError for two
        checkpoint.set_rng_state(dict(state, paddle_cpu=current))
        checkpoint.set_rng_state(dict({k: v for k, v in state.items() if k != "paddle_cpu"}, paddle=states))
        np.testing.assert_array_equal(paddle.rand([3]).numpy(), next_draw)  # not set back to state's


# --------------------------------------------------- audit #12: O2 optimizer state round trip
def test_o2_optimizer_state_restores_into_a_second_model_in_one_process():
    cfg = cfg_of()

    def build():
        m = as_o2(models.resnet20())
        opt, _ = engine.build_optimizer(cfg, m.parameters(), 10)
        opt._multi_precision = True  # what decorate(O2) sets
        return m, opt

    def make_accumulators(m, opt):  # what the first opt.step() does before the kernel runs
        if getattr(opt, "helper", None) is None:  # 2.6 sets it in _create_optimization_pass
            from paddle.base.layer_helper import LayerHelper
            opt.helper = LayerHelper(type(opt).__name__)
        params = [p for p in m.parameters() if not p.stop_gradient]
        opt._create_accumulators(paddle.static.default_main_program().global_block(), params)

    a, opt_a = build()
    make_accumulators(a, opt_a)
    state = checkpoint.optimizer_state(opt_a, a)
    assert "conv1.weight" in state["master_weights"]
    b, opt_b = build()  # other generated parameter names
    assert a.conv1.weight.name != b.conv1.weight.name
    checkpoint.set_optimizer_state(opt_b, b, state)
    make_accumulators(b, opt_b)  # 787e1f8: AssertionError "Optimizer set error ... should in state dict"


# ------------------------------------------------------- the option decisions (pure)
@pytest.mark.parametrize("values,version,device,cap,message", [
    (dict(amp=True), P3, "cpu", None, "--amp-dtype float16 needs a GPU"),
    (dict(amp=True), P3, "gpu", (6, 1), "needs compute capability 7.0, this GPU has 6.1"),
    (dict(amp=True, amp_dtype="bfloat16"), P3, "gpu", (7, 5), "use --amp-dtype float16"),
    (dict(amp=True, amp_dtype="bfloat16", to_static=True), P26, "gpu", (8, 0), "trains in fp16 without loss scaling"),
    (dict(amp=True, amp_dtype="bfloat16", amp_level="O2"), P3, "gpu", (8, 0), "no momentum (SGD) kernel"),
    (dict(amp=True, amp_dtype="bfloat16", amp_level="O2"), P26, "gpu", (9, 0), "no momentum (SGD) kernel"),
    (dict(model="fast_resnet", to_static=True), P26, "cpu", None, "cannot compile fast_resnet's frozen-scale BatchNorm"),
    (dict(model="fast_plain", to_static=True), P26, "gpu", (8, 0), "on Paddle 2.6: drop --to-static"),
])
def test_training_plan_refuses_what_cannot_work(values, version, device, cap, message):
    with pytest.raises(errors.UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        devices.training_plan(cfg_of(**values), version, device, cap)


def test_paddle3_compiles_the_fast_networks():
    assert devices.training_plan(cfg_of(model="fast_resnet", to_static=True), P3, "cpu")["amp"] is False


AMX = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
ZEN4 = ("avx512f", "avx512_bf16")
AVX2 = ("avx2", "fma")


@pytest.mark.parametrize("values,flags,message", [
    (dict(amp=True, amp_dtype="bfloat16"), AVX2, "this CPU's flags have neither amx_bf16 nor avx512_bf16"),
    (dict(amp=True, amp_dtype="bfloat16", amp_level="O2"), AMX, "on the CPU bf16 runs as O1"),
    (dict(amp=True, amp_dtype="bfloat16", cpu_kernels="paddle"), ZEN4, "drop --cpu-kernels paddle"),
    (dict(amp=True, amp_dtype="bfloat16", to_static=True), AMX, "and --to-static"),
    (dict(amp=True), AMX, "--amp-dtype float16 needs a GPU"),
])
def test_cpu_bf16_is_refused_where_it_cannot_run(values, flags, message):
    with pytest.raises(errors.UserError, match=message):
        devices.training_plan(cfg_of(**values), P3, "cpu", flags=flags)


@pytest.mark.parametrize("limit,refused", [("AVX2", True), ("avx2_vnni", True), ("AVX512_CORE", False),
                                           ("AVX512_CORE_AMX", False)])
def test_a_onednn_isa_limit_below_avx512_refuses_bf16_in_one_line(limit, refused):
    isa = devices.onednn_isa_limit({"ONEDNN_MAX_CPU_ISA": limit})
    cfg = cfg_of(amp=True, amp_dtype="bfloat16")
    if refused:
        with pytest.raises(errors.UserError, match=f"ONEDNN_MAX_CPU_ISA={limit} keeps it from it"):
            devices.training_plan(cfg, P3, "cpu", flags=ZEN4, isa_limit=isa)
    else:
        assert devices.training_plan(cfg, P3, "cpu", flags=ZEN4, isa_limit=isa)["cpu_bf16"] == "AVX512-BF16"
    assert devices.onednn_isa_limit({}) is None
    assert devices.training_plan(cfg_of(), P3, "cpu", flags=ZEN4, isa_limit=isa)["amp"] is False  # fp32 runs


@pytest.mark.parametrize("flags,units", [(AMX, "AMX"), (ZEN4, "AVX512-BF16")])
def test_cpu_bf16_plan_names_the_units(flags, units):
    plan = devices.training_plan(cfg_of(amp=True, amp_dtype="bfloat16"), P26, "cpu", flags=flags)
    assert plan["cpu_bf16"] == units and plan["amp"] and not plan["loss_scaling"]
    assert devices.training_plan(cfg_of(), P3, "cpu", flags=flags)["cpu_bf16"] is None


@pytest.mark.parametrize("flags,vendor,slower", [(ZEN4, "GenuineIntel", True), (ZEN4, "AuthenticAMD", False),
                                                 (AMX, "GenuineIntel", False)])
def test_bf16_on_intels_avx512_bf16_without_amx_is_said_to_be_slower(flags, vendor, slower):
    """Intel's vdpbf16ps without AMX does half fp32's multiply-adds (device.SLOW_BF16): the
    run says so and trains in bf16 as asked; check_env says to train in fp32."""
    plan = devices.training_plan(cfg_of(amp=True, amp_dtype="bfloat16"), P3, "cpu", flags=flags, vendor=vendor)
    assert plan["cpu_bf16_slower"] is slower and plan["amp"]
    assert devices.training_plan(cfg_of(), P3, "cpu", flags=flags, vendor=vendor)["cpu_bf16_slower"] is False
    cpu = dict(facts(P3, gpus=()), cpu_bf16=plan["cpu_bf16"], cpu_kernels_ok=True, cpu_bf16_slower=slower)
    line = next(x for x in check_env.report(cpu) if x.startswith("CPU bf16 training"))
    assert line.endswith(f"yes, on {plan['cpu_bf16']}" + (f", but {devices.SLOW_BF16}; train in fp32" if slower else ""))


def test_cpu_info_reads_a_field_by_its_whole_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nvmx flags\t: ept vpid\nflags\t\t: fpu avx512_bf16\n"
                    "\nprocessor\t: 1\nvendor_id\t: Other\n")
    assert devices.cpu_info("vendor_id", info) == "GenuineIntel"
    assert devices.cpu_info("flags", info) == "fpu avx512_bf16"
    assert devices.cpu_info("model name", info) == "" and devices.cpu_info("flags", tmp_path / "none") == ""


@pytest.mark.parametrize("values,version,cap,expected", [
    (dict(), P3, None, dict(amp=False, loss_scaling=False, fp32_eval_copy=False, cudnn_deterministic=False)),
    (dict(amp=True), P26, (7, 0), dict(amp=True, loss_scaling=True, fp32_eval_copy=False)),
    (dict(amp=True, amp_level="O2"), P3, (8, 6), dict(loss_scaling=True, fp32_eval_copy=True)),
    (dict(amp=True, amp_dtype="bfloat16"), P3, (8, 0), dict(loss_scaling=False)),
    (dict(amp=True, amp_dtype="bfloat16", to_static=True), P3, (9, 0), dict(amp=True)),
    (dict(amp=True, amp_dtype="bfloat16", amp_level="O2", optimizer="adam"), P26, (8, 0), dict(fp32_eval_copy=True)),
    (dict(deterministic=True), P3, (8, 0), dict(cudnn_deterministic=True)),
])
def test_training_plan_settings(values, version, cap, expected):
    plan = devices.training_plan(cfg_of(**values), version, "gpu", cap)
    assert {k: plan[k] for k in expected} == expected
    assert devices.training_plan(cfg_of(deterministic=True), P3, "cpu")["cudnn_deterministic"] is False


def facts(version=P3, cuda_build=True, gpus=((9, 0),), archs=None, probed=False, conv_error=None):
    return dict(paddle=version, cuda_build=cuda_build, cuda="12.6" if cuda_build else "False",
                cudnn="9.5" if cuda_build else "False", cuda_archs=archs, probed=probed, conv_error=conv_error,
                gpus=[dict(name=f"GPU sm_{a}{b}", capability=(a, b), memory_mb=81559) for a, b in gpus],
                shm_mb=64, cpu_threads="2")


@pytest.mark.parametrize("f,problem", [
    (facts(cuda_build=False, gpus=()), None),
    (facts(P26, gpus=((9, 0),)), "sm_90) cannot run this Paddle 2.6.2 (built for sm_61/70/75/80/86)"),
    (facts(P26, gpus=((8, 6),)), None),
    (facts(P26, gpus=((8, 9),)), None),  # sm_86 code runs on sm_89
    (facts(P26, gpus=((12, 0),)), "sm_120) cannot run"),
    (facts(P3, gpus=((9, 0),), archs=[70, 80, 90]), None),
    (facts(P3, gpus=((9, 0),), probed=True, conv_error="RuntimeError: no kernel image is available"),
     "no kernel image"),
    (facts(P3, gpus=()), "sees no GPU"),
])
def test_gpu_problem_with_injected_facts(f, problem):
    found = devices.gpu_problem(f)
    assert (found is None) if problem is None else (problem in found and "\n" not in found)
    if found and "cannot run" in found:
        assert "Paddle 3.x GPU build for CUDA 12" in found


def test_the_device_probe_checks_its_result(monkeypatch):
    assert devices.probe_conv() is None  # here on the CPU: the convolution is right
    monkeypatch.setattr(paddle.nn.functional, "conv2d", lambda x, w: paddle.zeros([1, 4, 6, 6]))
    assert devices.probe_conv() == "a test convolution of ones summed to 0, not 3888"


def test_amp_dtypes_by_capability():
    assert devices.amp_dtypes((6, 1)) == [] and devices.amp_dtypes((7, 5)) == ["float16"]
    assert devices.amp_dtypes((9, 0)) == ["float16", "bfloat16"]


def test_check_env_on_this_machine_and_with_injected_gpus(capsys):
    got = check_env.main([])
    out = capsys.readouterr().out
    assert f"Paddle {paddle.__version__}" in out and "CPU threads" in out
    units = devices.cpu_bf16_units(devices.cpu_flags())
    assert ("CPU bf16 inference (eval.py --inference --precision bf16): " + (f"yes, on {units}" if units else "no: ")) in out
    if units:  # Paddle 3.x cannot write GELU in the program format (predictors.export)
        assert ("not the fast networks on Paddle 3.x" in out) == (not paddle.__version__.startswith("2."))
    if not got["cuda_build"]:
        assert out.strip().endswith("no GPU: training runs on the CPU")
        with pytest.raises(SystemExit) as e:
            check_env.main(["--require-gpu"])
        assert str(e.value.code).startswith("error: no usable GPU")
    lines = check_env.report(facts(P26, gpus=((9, 0), (7, 5))))
    assert "GPU 1: GPU sm_75, compute capability 7.5, 81,559 MB; AMP: float16" in lines
    # a GPU box's CPU lines say they hold with --device cpu (T7); an ISA limit below AVX512 says no
    gpu_box = dict(facts(P3, gpus=((9, 0),)), cpu_bf16="AVX512-BF16", cpu_kernels_ok=True)
    assert "CPU bf16 training (--amp --amp-dtype bfloat16 with --device cpu): yes, on AVX512-BF16" in \
        check_env.report(gpu_box)
    limited = dict(gpu_box, gpus=[], isa_limit=("ONEDNN_MAX_CPU_ISA", "AVX2"))
    assert "CPU bf16 training (--amp --amp-dtype bfloat16): no: ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN from its " \
           "AVX512 code" in check_env.report(limited)
    status, last = check_env.verdict(facts(P26, gpus=((9, 0),)))
    assert status == 1 and last.startswith("error: GPU 0")
    assert check_env.verdict(facts(P3, gpus=((9, 0),), archs=[90]))[0] == 0


# --------------------------------------------------------------- inference (audit #8, #14)
def test_gpu_inference_options():
    with pytest.raises(errors.UserError, match="need a GPU"):
        predictors.check_gpu_inference("m/model.pdmodel", False, "fp16", False)
    with pytest.raises(errors.UserError, match="does not apply to a Paddle 3.3.1 export"):
        predictors.check_gpu_inference("m/model.json", True, "fp16", True, "3.3.1")
    predictors.check_gpu_inference("m/model.pdmodel", True, "fp16", True)
    predictors.check_gpu_inference("m/model.json", True, "fp16", False)
    with pytest.raises(errors.UserError, match="bf16 is oneDNN's bf16 on the CPU: add --device cpu, or on the GPU use --precision fp16"):
        predictors.check_gpu_inference("m/model.pdmodel", True, "bf16", False)
    with pytest.raises(errors.UserError, match="needs a CPU with bf16 units"):
        predictors.check_cpu_bf16("m/model.pdmodel", ["avx512f"])
    predictors.check_cpu_bf16("m/model.pdmodel", ["avx512_bf16"])
    with pytest.raises(errors.UserError, match="runs a model.pdmodel export"):
        predictors.check_cpu_bf16("m/model.json", ["amx_bf16"])


# ------------------------------------------------------------- audit #19: load on the CPU
def test_checkpoints_load_onto_the_cpu(tmp_path):
    path = str(tmp_path / "x.pdckpt")
    checkpoint.save(path, dict(model=models.resnet20().state_dict(), config={}))
    state = checkpoint.load(path)
    assert state["model"]["conv1.weight"].place.is_cpu_place()
    assert paddle.get_device() == "cpu"  # the default place is put back as it was


@pytest.mark.skipif(not paddle.__version__.startswith("2."), reason="the fp16 cast is Paddle 2.6's dy2static")
def test_paddle26_to_static_casts_a_bf16_program_to_fp16_so_the_plan_refuses_it():
    """Audit #6: 2.6's PartialProgramLayer builds its AMP programs with the fp16 default,
    whatever dtype auto_cast asked for (reproduced on the CPU, conv2d put back in the
    bf16 white list as a GPU has it)."""
    import logging
    from paddle.base import core, framework
    logging.disable(logging.WARNING)
    net = paddle.jit.to_static(paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.ReLU()), full_graph=True)
    tracer = framework._dygraph_tracer()
    tracer._amp_level, tracer._amp_dtype = core.AmpLevel.O1, "bfloat16"
    try:
        _, program = net.forward.get_concrete_program(paddle.rand([1, 3, 8, 8]))
    finally:
        tracer._amp_level = core.AmpLevel.O0
        logging.disable(logging.NOTSET)
    amp_list = program._amp_list
    amp_list.white_list.add("conv2d")
    amp_list.unsupported_list.discard("conv2d")
    amp_list.black_list.discard("conv2d")
    block = program._create_amp_program(is_infer_mode=True).global_block()
    dtypes = {str(block.var(op.output_arg_names[0]).dtype) for op in block.ops if op.type == "conv2d"}
    assert dtypes == {"paddle.float16"}  # bfloat16 was asked for
    with pytest.raises(errors.UserError, match="trains in fp16"):
        devices.training_plan(cfg_of(amp=True, amp_dtype="bfloat16", to_static=True), paddle.__version__, "gpu", (8, 0))


# ============================================= the second audit (docs/gpu.md, N1-N15)
def test_checked_finds_a_failed_sample_without_reading_the_labels():
    """N3: the labels of a DataLoader batch are on the GPU; reading them every step was
    the one device sync of a 3.x fp32/bf16 step. The failure flag is host memory."""
    class DeviceLabels:
        def numpy(self):
            raise AssertionError("a device-to-host copy every step")

    dataset = data.SplitDataset([(None, 0)] * 6, range(6))
    loader = [(None, DeviceLabels())] * 3
    assert len(list(data.Checked(loader, dataset))) == 3
    dataset.failed.value = 4 + 1  # what __getitem__ writes, in a DataLoader worker or here
    with pytest.raises(errors.UserError, match=r"^sample 4 could not be read \(it failed in a DataLoader worker"):
        next(iter(data.Checked(loader, dataset)))


def test_a_resume_under_another_process_count_is_refused():
    """N5: the schedule after a resume on another number of GPUs (reproduced: lr 0.1023 ->
    0.0860, 1,056 of 1,408 iterations): refused in one line; tests/test_distributed.py
    runs it with 2 ranks and 1."""
    state = dict(world_size=2, config=dict(batch_size=128))
    checkpoint.check_same_world(state, 2, "runs/x")
    checkpoint.check_same_world(dict(state, world_size=None), 1, "runs/x")  # before the key: as before
    with pytest.raises(errors.UserError, match=r"trained by 2 processes and this is 1; .*global batch \(2 x 128\)"):
        checkpoint.check_same_world(state, 1, "runs/x")
    with pytest.raises(errors.UserError, match=r"trained by 1 process and this is 4; .*without the launcher"):
        checkpoint.check_same_world(dict(state, world_size=1), 4, "runs/x")


@pytest.mark.parametrize("device,backend", [("cpu", "gloo"), ("gpu", None)])
def test_a_cpu_launch_joins_with_gloo_and_keeps_the_cpu(monkeypatch, device, backend):
    """N2: on a GPU build the backend 'auto' is NCCL, which sets the place to the GPU."""
    import paddle.distributed as dist
    for k, v in dict(PADDLE_TRAINER_ID="0", PADDLE_TRAINERS_NUM="2", PADDLE_CURRENT_ENDPOINT="127.0.0.1:1",
                     PADDLE_TRAINER_ENDPOINTS="127.0.0.1:1,127.0.0.1:2").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("PADDLE_DISTRI_BACKEND", raising=False)
    calls = []
    monkeypatch.setattr(dist, "init_parallel_env", lambda: calls.append(("init", os.environ.get("PADDLE_DISTRI_BACKEND"))))
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(paddle, "set_device", lambda d: calls.append(("set_device", d)))
    import launch
    assert launch.init_distributed(device) == (2, 0)
    assert calls == [("init", backend), ("set_device", device)]  # the device again, after the group


def test_o2_master_weights_go_where_their_parameters_are():
    """N6: load() makes the masters on the CPU; each goes to its parameter's place."""
    cfg = cfg_of()
    m = as_o2(models.resnet20())
    opt, _ = engine.build_optimizer(cfg, m.parameters(), 10)
    masters = {k: paddle.to_tensor(p.astype("float32").numpy() + 1) for k, p in m.named_parameters()}
    checkpoint.set_optimizer_state(opt, m, dict(checkpoint.optimizer_state(opt, m), master_weights=masters))
    installed = opt._master_weights[m.conv1.weight.name]
    assert installed.name == m.conv1.weight.name + "_fp32_master_0"
    assert str(installed.place) == str(m.conv1.weight.place) and installed.dtype == paddle.float32
    np.testing.assert_array_equal(installed.numpy(), masters["conv1.weight"].numpy())


def test_the_plan_uses_each_ranks_gpu():
    """N7: GPU 0's capability decided for every rank; now the rank's own, lowest over the ranks."""
    import launch
    f = facts(gpus=((7, 0), (8, 0)))
    assert devices.capability(f, "gpu:1") == (8, 0) and devices.capability(f, "gpu:0") == (7, 0)
    assert devices.capability(f, "gpu") == (7, 0) and devices.capability(facts(gpus=()), "gpu:0") is None
    assert launch.lowest_capability((8, 0), 1) == (8, 0)


def test_inference_predictor_checks_the_device_and_leaves_the_place(tmp_path, monkeypatch):
    """N8: --inference-model --device gpu on a CPU build ran on the CPU without a word."""
    for name in (predictors.META, "model.json", "model.pdiparams"):
        (tmp_path / name).write_text('{"class_names": ["a"], "preprocess": {}}')
    before = paddle.get_device()
    if not paddle.is_compiled_with_cuda():
        with pytest.raises(errors.UserError, match="--device gpu: this Paddle has no usable GPU"):
            predictors.InferenceModelPredictor(str(tmp_path), device="gpu")
    asked = []

    def select_device(name):  # switches the place, then stops before the dummy files are read
        asked.append(name)
        paddle.set_device("cpu")
        raise errors.UserError("checked")

    monkeypatch.setattr(devices, "select_device", select_device)
    with pytest.raises(errors.UserError, match="checked"):
        predictors.InferenceModelPredictor(str(tmp_path), device="auto")
    assert asked == ["auto"] and paddle.get_device() == before


def test_export_puts_the_device_back(monkeypatch, tmp_path):
    """N10: the notebook's export cell switched the whole kernel to the CPU."""
    import export
    current = ["gpu:0"]  # a notebook on a GPU
    monkeypatch.setattr(paddle, "get_device", lambda: current[0])
    monkeypatch.setattr(paddle, "set_device", lambda d: current.__setitem__(0, d))

    class Predictor:
        def __init__(self, ckpt, device):
            paddle.set_device(device)  # what select_device does

    monkeypatch.setattr(predictors, "CheckpointPredictor", Predictor)
    monkeypatch.setattr(predictors, "export", lambda p, out, shipped_to=None: (current.append(paddle.get_device()), out)[1])
    export.main(["--ckpt", "x.pdckpt", "--output", str(tmp_path / "e")])
    assert current == ["gpu:0", "cpu"]  # exported on the CPU, the GPU put back


def test_one_fp16_overflow_is_skipped_twenty_in_a_row_stop_the_run(tmp_path):
    """N11: a forward overflow (inf loss) is a step the GradScaler skips, not a divergence."""
    run, cfg = checkpoint.RunState(), cfg_of(output_dir=str(tmp_path))
    inf, two = paddle.to_tensor(float("inf")), paddle.to_tensor(2.0)
    for loss in (two, inf, two):
        engine.add_step_loss(run, loss, skip_overflow=True)
    assert float(run.loss_sum) == 4.0 and int(run.overflows) == 0
    engine.check_finite(run, 0, cfg)
    for _ in range(engine.MAX_OVERFLOWS - 1):
        engine.add_step_loss(run, inf, skip_overflow=True)
    engine.check_finite(run, 0, cfg)
    engine.add_step_loss(run, inf, skip_overflow=True)
    with pytest.raises(errors.UserError, match="the fp16 loss overflowed 20 steps in a row at epoch 1"):
        engine.check_finite(run, 0, cfg)
    fp32 = checkpoint.RunState()
    engine.add_step_loss(fp32, inf)  # fp32 and bf16: one inf is a diverged run, as before
    with pytest.raises(errors.UserError, match="the training loss became inf"):
        engine.check_finite(fp32, 0, cfg)


def test_o2_state_dict_casts_each_tensor_once(monkeypatch):
    """N12: decorate's hook on every sublayer cast 3,378 times per state_dict() of ResNet-20."""
    from paddle.amp.auto_cast import StateDictHook
    m = as_o2(models.resnet20())
    hooked = {k: v.numpy() for k, v in m.state_dict().items()}
    called = []
    monkeypatch.setattr(StateDictHook, "__call__", lambda self, d: called.append(1))
    fp32 = checkpoint.fp32_state_dict(m)
    assert not called and set(fp32) == set(hooked)
    for k, v in fp32.items():
        assert v.dtype in (paddle.float32, paddle.int64), k
        np.testing.assert_array_equal(v.numpy(), hooked[k], err_msg=k)


def test_gpu_problem_advice_follows_the_error():
    """N13: a missing system library is not fixed by another Paddle."""
    lib = facts(P26, gpus=((8, 0),), probed=True, conv_error="OSError: libcudnn.so.8: cannot open shared object file")
    assert "install the CUDA 12.6 and cuDNN 9.5 libraries this Paddle was built against" in devices.gpu_problem(lib)
    arch = facts(P3, gpus=((9, 0),), probed=True, conv_error="RuntimeError: no kernel image is available")
    assert devices.NEW_PADDLE in devices.gpu_problem(arch)


def test_cifar_download_is_one_process_at_a_time(monkeypatch, tmp_path):
    """N14: every rank downloaded into the same cache file at once. The download now runs
    holding a lock file another process waits on (tried here from a second descriptor)."""
    import fcntl
    from paddle.vision import datasets
    monkeypatch.setattr(paddle.dataset.common, "DATA_HOME", str(tmp_path))
    seen = []

    def fake_cifar(**kw):
        with open(tmp_path / "cifar" / ".download.lock") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except OSError:
                seen.append("held")
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets, "Cifar10", fake_cifar)
    with pytest.raises(errors.UserError, match="could not be downloaded"):
        data.load_cifar("", "train")
    assert seen == ["held"]
