"""Running a trained model on images: from a checkpoint (dygraph) or from an exported
inference model through ``paddle.inference`` (the fast path for serving).

Both predictors take a float32 batch [N, 3, H, W], already preprocessed, and return
logits [N, num_classes] as numpy.
"""
import json
import os

import numpy as np
import paddle
from PIL import Image

import checkpoint
import data
import device as devices
from config import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
META = "meta.json"


def load_image(path):
    """An RGB PIL image; grayscale, palette, RGBA and CMYK files are converted.
    Raises OSError/ValueError for a file PIL cannot decode."""
    with Image.open(path) as img:
        img.load()  # decode now: a truncated file fails here, not later
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # PIL's advice for palette images with transparency
        return img.convert("RGB")


def list_images(folder):
    """Image files under ``folder`` (recursively), sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


class CheckpointPredictor:
    """The model of a checkpoint (``state``: the checkpoint already loaded, if it is)."""

    def __init__(self, ckpt, device="auto", state=None):
        devices.select_device(device)
        state = state if state is not None else checkpoint.load(ckpt)
        self.ckpt = ckpt
        self.cfg, self.model = checkpoint.model_from_checkpoint(state)
        self.model.eval()
        self.class_names = list(state["class_names"])
        self.preprocess = state.get("preprocess") or data.CIFAR10_PREPROCESS

    @paddle.no_grad()
    def __call__(self, batch):
        return self.model(paddle.to_tensor(batch)).numpy()


def export(predictor, output_dir):
    """Save a CheckpointPredictor's model with paddle.jit.save (batch size dynamic) plus
    meta.json (class names, preprocessing). Returns the path prefix of the saved model."""
    os.makedirs(output_dir, exist_ok=True)
    size = predictor.preprocess["crop"]
    spec = [paddle.static.InputSpec([None, 3, size, size], "float32", name="image")]
    prefix = os.path.join(output_dir, "model")
    paddle.jit.save(predictor.model, prefix, input_spec=spec)
    with open(os.path.join(output_dir, META), "w") as f:
        json.dump(dict(model=predictor.cfg.model, class_names=predictor.class_names,
                       preprocess=predictor.preprocess, checkpoint=os.path.abspath(predictor.ckpt),
                       paddle_version=paddle.__version__), f, indent=1)
    return prefix


class InferenceModelPredictor:
    """An exported model run by paddle.inference: on the CPU with oneDNN and the graph
    passes that fuse conv + BN (+ ReLU); on the GPU when Paddle has one, optionally in
    fp16 and through TensorRT (where Paddle was built with it)."""

    def __init__(self, model_dir, device="auto", threads=None, precision="fp32", tensorrt=False):
        from paddle import inference
        meta_path = os.path.join(model_dir, META)
        if not os.path.isfile(meta_path):
            raise UserError(f"--inference-model {model_dir}: no {META}; make it with export.py --output {model_dir}")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            self.class_names, self.preprocess = meta["class_names"], meta["preprocess"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--inference-model {model_dir}: {META} is unreadable ({type(e).__name__}); "
                            f"export the model again with export.py --output {model_dir}")
        # Paddle 3.x writes model.json, 2.x model.pdmodel; 3.x reads both
        model_file = next((os.path.join(model_dir, "model" + ext) for ext in (".json", ".pdmodel")
                           if os.path.isfile(os.path.join(model_dir, "model" + ext))), None)
        if model_file is None:
            raise UserError(f"--inference-model {model_dir}: no model.json or model.pdmodel in it")
        config = inference.Config(model_file, os.path.join(model_dir, "model.pdiparams"))
        config.disable_glog_info()
        config.switch_ir_optim(True)
        use_gpu = device == "gpu" or (device == "auto" and devices.has_gpu())
        if use_gpu:
            half = inference.PrecisionType.Half if precision == "fp16" else inference.PrecisionType.Float32
            if tensorrt:
                config.enable_use_gpu(256, 0)
                config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=256, min_subgraph_size=3,
                                              precision_mode=half, use_static=False, use_calib_mode=False)
            else:
                config.enable_use_gpu(256, 0, half)
        elif precision != "fp32" or tensorrt:
            raise UserError("fp16 and TensorRT inference need a GPU; drop --precision fp16 / --tensorrt")
        else:
            config.disable_gpu()
            if hasattr(config, "enable_onednn"):  # 3.x name; 2.6 has only enable_mkldnn
                config.enable_onednn()
            else:
                config.enable_mkldnn()
            config.set_cpu_math_library_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS", "1")))
        self.predictor = inference.create_predictor(config)
        self.input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self.output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    def __call__(self, batch):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self.input.reshape(list(batch.shape))
        self.input.copy_from_cpu(batch)
        self.predictor.run()
        return self.output.copy_to_cpu()
