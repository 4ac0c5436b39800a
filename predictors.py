"""Running a trained model on images: from a checkpoint (dygraph) or from an exported
inference model through ``paddle.inference`` (the fast path for serving).

Both predictors take a float32 batch [N, 3, H, W], already preprocessed, and return
logits [N, num_classes] as numpy.
"""
import contextlib
import json
import os

import numpy as np
import paddle

import checkpoint
import data
import device as devices
from errors import UserError
from files import output_to

# the image files predict.py reads: the same rules as training's image folders
IMAGE_EXTENSIONS, load_image, list_images = data.IMAGE_EXTENSIONS, data.load_image, data.list_images
META = "meta.json"


class CheckpointPredictor:
    """The model of a checkpoint (``state``: the checkpoint already loaded, if it is)."""

    def __init__(self, ckpt, device="auto", state=None):
        devices.select_device(device)
        state = state if state is not None else checkpoint.load(ckpt)
        self.ckpt = ckpt
        self.cfg, self.model = checkpoint.model_from_checkpoint(state)
        self.model.eval()
        self.class_names = list(state["class_names"])
        self.preprocess = state.get("preprocess") or data.preprocess_of(self.cfg)  # or from its config

    @paddle.no_grad()
    def __call__(self, batch):
        return self.model(paddle.to_tensor(batch)).numpy()


def export(predictor, output_dir, program=False, shipped_to=None):
    """Save a CheckpointPredictor's model with paddle.jit.save (batch size dynamic) plus
    meta.json (class names, preprocessing, the checkpoint's path from the export: no
    user's home directory in a file that is shipped). Returns the path prefix of the saved model.
    program: a model.pdmodel (Paddle's program format, 2.x's export) on 3.x too, in place of
    model.json: what bf16 inference runs on (check_cpu_bf16). shipped_to: the folder the
    files end up in, when ``output_dir`` is a temporary one (the checkpoint's path is from it)."""
    os.makedirs(output_dir, exist_ok=True)
    size = predictor.preprocess["crop"]
    spec = [paddle.static.InputSpec([None, 3, size, size], "float32", name="image")]
    prefix = os.path.join(output_dir, "model")
    old_ir = program and hasattr(paddle.pir_utils, "OldIrGuard")  # 3.x; 2.x writes a model.pdmodel anyway
    if old_ir and any(getattr(layer, "act", None) == "gelu" for layer in predictor.model.sublayers()):
        # 3.x's F.gelu is _C_ops.gelu alone: "gelu(): argument (position 1) must be Value, but got Variable"
        raise UserError(f"Paddle {paddle.__version__} cannot write {predictor.cfg.model}'s GELU in the program "
                        f"format (model.pdmodel) that bf16 inference runs; evaluate in bf16 on our CPU kernels "
                        f"instead: drop --inference")
    # quiet: 3.x's saver says "New Executor is Running" or "PIR not support input out tensor for now!!!!!"
    with paddle.pir_utils.OldIrGuard() if old_ir else contextlib.nullcontext(), output_to(os.devnull):
        paddle.jit.save(predictor.model, prefix, input_spec=spec)
    with open(os.path.join(output_dir, META), "w") as f:
        json.dump(dict(model=predictor.cfg.model, class_names=predictor.class_names,
                       preprocess=predictor.preprocess, checkpoint=os.path.relpath(predictor.ckpt, shipped_to or output_dir),
                       paddle_version=paddle.__version__), f, indent=1)
    return prefix


ONNX_OPSET = 13  # onnxruntime runs every opset from 7; 13 has every op a ResNet needs
ONNX_NEEDS = "pip install -r requirements-onnx.txt"


def onnx_needs_paddle3():
    return (f"ONNX export needs Paddle 3.x: paddle2onnx 2.x reads its model.json, and this is Paddle "
            f"{paddle.__version__}; use Paddle 3.x, or export without --format onnx")


def onnx_converter():
    """The paddle2onnx module, or one UserError: it converts Paddle 3.x exports only, and
    it is an optional install."""
    if paddle.__version__.startswith("2."):
        raise UserError(onnx_needs_paddle3())
    try:
        import paddle2onnx
    except ImportError:
        raise UserError(f"--format onnx needs paddle2onnx: {ONNX_NEEDS}")
    return paddle2onnx


def export_onnx(model_dir):
    """Convert the export in ``model_dir`` (model.json + model.pdiparams) to model.onnx
    beside it with paddle2onnx (batch size dynamic). Returns its path."""
    if not os.path.isfile(os.path.join(model_dir, "model.json")):
        raise UserError(onnx_needs_paddle3())
    paddle2onnx = onnx_converter()
    path = os.path.join(model_dir, "model.onnx")
    try:  # optimize_tool "none": its default (polygraphy) would pip-install packages to fold constants
        with output_to(os.devnull):  # its progress lines name the temporary folder: export.py says where it went
            paddle2onnx.export(os.path.join(model_dir, "model.json"), os.path.join(model_dir, "model.pdiparams"),
                               path, opset_version=ONNX_OPSET, enable_onnx_checker=True, optimize_tool="none")
    except Exception as e:
        raise UserError(f"paddle2onnx could not convert {model_dir} ({type(e).__name__}: {str(e)[:200]})")
    return path


def read_meta(meta_path, what, how):
    """(class names, preprocessing) from an export's meta.json; ``what`` names the export
    and ``how`` makes it again, for the error."""
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        return meta["class_names"], meta["preprocess"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{what}: {META} is unreadable ({type(e).__name__}); export the model again with {how}")


class OnnxPredictor:
    """An exported model.onnx run by onnxruntime on the CPU (meta.json beside it names the
    classes and the preprocessing)."""

    def __init__(self, path):
        meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), META)
        if not os.path.isfile(path):
            raise UserError(f"--onnx {path}: no such file; make it with export.py --format onnx")
        if not os.path.isfile(meta_path):
            raise UserError(f"--onnx {path}: no {META} beside it; export it again with export.py --format onnx")
        try:
            import onnxruntime
        except ImportError:
            raise UserError(f"--onnx needs onnxruntime: {ONNX_NEEDS}")
        self.class_names, self.preprocess = read_meta(meta_path, f"--onnx {path}", "export.py --format onnx")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: not its notes about unused initializers
        try:
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UserError(f"onnxruntime could not load {path} ({type(e).__name__}); export it again")
        self.input, self.path = self.session.get_inputs()[0], path

    def __call__(self, batch):
        try:
            return self.session.run(None, {self.input.name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        except Exception as e:  # onnxruntime's own error types
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            takes, given = list(self.input.shape[1:]), list(np.shape(batch)[1:])
            if all(isinstance(t, int) for t in takes) and takes != given:
                raise UserError(f"--onnx {self.path} takes images of shape {takes}, and its {META} prepares them "
                                f"as {given}: they come from two exports; export the model again with export.py "
                                "--format onnx")
            raise UserError(f"onnxruntime could not run {self.path} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); export it again with export.py --format onnx")


TENSORRT_MAX_BATCH = 256  # TensorRT's static-shape engine refuses larger batches


def tensorrt_wanted():
    """The TensorRT this Paddle build was compiled against, as a user installs it."""
    from paddle import inference
    version = tuple(inference.get_trt_compile_version()) if hasattr(inference, "get_trt_compile_version") else ()
    if not any(version):  # a build without TensorRT says (0, 0, 0)
        return "a Paddle build with TensorRT (this one has none) and its TensorRT"
    return f"TensorRT {'.'.join(map(str, version))} (the version this Paddle was built with)"


# bf16 inference on the CPU: oneDNN's bf16 passes on a model.pdmodel (the program format),
# which leave the classifier's logits fp32; on a model.json every op runs bf16, the logits
# too, and 1.6-2x as many predictions change. Chosen on a validation split, then the
# test sets of two 12-epoch ResNet-20 runs: within 0.1 points of fp32 (docs/speed.md).
def check_cpu_bf16(model_file, flags):
    """UserError where bf16 inference cannot run: a CPU without bf16 units, or a model.json."""
    if devices.cpu_bf16_units(flags) is None:
        raise UserError("--precision bf16 needs a CPU with bf16 units (avx512_bf16 or amx_bf16 in its flags; this "
                        "one has neither); use --precision fp32")
    if not model_file.endswith(".pdmodel"):
        raise UserError(f"--precision bf16 runs a model.pdmodel export, and {os.path.dirname(model_file)} holds "
                        f"{os.path.basename(model_file)}; use eval.py --ckpt ... --inference --precision bf16")


def check_gpu_inference(model_file, use_gpu, precision, tensorrt, paddle_version=paddle.__version__):
    """UserError for a GPU inference option that cannot work (GPU audit #8)."""
    if use_gpu and precision == "bf16":
        raise UserError("--precision bf16 is oneDNN's bf16 on the CPU: add --device cpu, or on the GPU use "
                        "--precision fp16")
    if not use_gpu and (precision == "fp16" or tensorrt):
        raise UserError("fp16 and TensorRT inference need a GPU; drop --precision fp16 / --tensorrt")
    if tensorrt and model_file.endswith(".json"):
        # Paddle 3.x runs a model.json (PIR) without its TensorRT subgraph pass: the option
        # would silently do nothing (paddle/fluid/inference/api/analysis_predictor.cc)
        raise UserError(f"--tensorrt does not apply to a Paddle {paddle_version} export (model.json): Paddle runs "
                        "it without TensorRT; drop --tensorrt (--precision fp16 alone works)")


class InferenceModelPredictor:
    """An exported model run by paddle.inference: on the CPU with oneDNN and the graph
    passes that fuse conv + BN (+ ReLU), optionally in bf16 (a model.pdmodel); on the GPU
    when Paddle has one, optionally in fp16 and through TensorRT (where Paddle was built with it)."""

    def __init__(self, model_dir, device="auto", threads=None, precision="fp32", tensorrt=False):
        from paddle import inference
        meta_path = os.path.join(model_dir, META)
        if not os.path.isfile(meta_path):
            raise UserError(f"--inference-model {model_dir}: no {META}; make it with export.py --output {model_dir}")
        self.class_names, self.preprocess = read_meta(meta_path, f"--inference-model {model_dir}",
                                                      f"export.py --output {model_dir}")
        # Paddle 3.x writes model.json, 2.x model.pdmodel; 3.x reads both
        model_file = next((os.path.join(model_dir, "model" + ext) for ext in (".json", ".pdmodel")
                           if os.path.isfile(os.path.join(model_dir, "model" + ext))), None)
        if model_file is None:
            raise UserError(f"--inference-model {model_dir}: no model.json or model.pdmodel in it")
        params = os.path.join(model_dir, "model.pdiparams")
        if not os.path.isfile(params):  # without it paddle.inference runs on uninitialised weights
            raise UserError(f"--inference-model {model_dir}: no model.pdiparams in it (the weights); "
                            f"export the model again with export.py --output {model_dir}")
        use_gpu = devices.check_device(device) == "gpu"  # --device gpu without a usable GPU is refused
        self.threads = threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
        check_gpu_inference(model_file, use_gpu, precision, tensorrt)
        bf16 = precision == "bf16"
        if bf16:
            check_cpu_bf16(model_file, devices.cpu_flags())
        config = inference.Config(model_file, params)
        config.disable_glog_info()
        config.switch_ir_optim(True)
        self.max_batch = TENSORRT_MAX_BATCH if tensorrt else None
        if use_gpu:
            half = inference.PrecisionType.Half if precision == "fp16" else inference.PrecisionType.Float32
            config.enable_use_gpu(256, 0, half)  # precision here too: the TensorRT call alone leaves the rest fp32
            if tensorrt:
                config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=TENSORRT_MAX_BATCH,
                                              min_subgraph_size=3, precision_mode=half, use_static=False,
                                              use_calib_mode=False)
        else:
            config.disable_gpu()
            if hasattr(config, "enable_onednn"):  # 3.x name; 2.6 has only enable_mkldnn
                config.enable_onednn()
            else:
                config.enable_mkldnn()
            if bf16 and hasattr(config, "enable_new_ir"):  # 3.x: the program's own passes, not PIR's
                config.enable_new_ir(False)
            config.set_cpu_math_library_num_threads(self.threads)
        try:
            # bf16: the switch and the program format's passes print a dozen lines of what they did
            with output_to(os.devnull) if bf16 else contextlib.nullcontext():
                if bf16:
                    (getattr(config, "enable_onednn_bfloat16", None) or config.enable_mkldnn_bfloat16)()  # 3.x; 2.6
                self.predictor = inference.create_predictor(config)
        except Exception as e:  # e.g. TensorRT asked for but libnvinfer not installed
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"paddle.inference could not load {model_dir} ({first})"
                            + (f"; --tensorrt needs {tensorrt_wanted()} installed" if tensorrt else ""))
        self.input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self.output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    def __call__(self, batch):
        if self.max_batch and len(batch) > self.max_batch:
            raise UserError(f"--tensorrt runs batches of at most {self.max_batch} images; use --batch-size {self.max_batch}")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self.input.reshape(list(batch.shape))
        self.input.copy_from_cpu(batch)
        self.predictor.run()
        # paddle.inference leaves this thread's MKL and OpenMP at one thread after a run
        # (analysis_predictor.cc, Run: SetNumThreads(1)): training later in this process (a
        # notebook; the tests) would run on one core
        paddle.base.core.set_num_threads(self.threads)
        return self.output.copy_to_cpu()
