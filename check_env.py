"""What this machine's Paddle can train on, before a long run.

    python check_env.py                 # exit 0: Paddle can train here (on the GPU, or on the CPU)
    python check_env.py --require-gpu   # exit 1 too when there is no usable GPU

Prints Paddle's version and build (CUDA, cuDNN, the GPU architectures it carries), each
visible GPU with its compute capability and memory, the AMP dtypes that will really run
on it, /dev/shm, CPU threads and which kernels CPU training uses (cpu_kernels/). A
GPU this Paddle cannot use (no kernels for it, e.g. PyPI's paddlepaddle-gpu 2.6.2 on an
H100) ends with one line naming the fix and exit 1.
train_cifar10.py and finetune.py run the same check when they pick a GPU.
"""
import sys

import cpu_settings  # noqa: F401  (first: the CPU settings, before paddle loads)
import device as devices
import errors
import cpu_kernels


def report(facts):
    """The lines check_env prints for ``facts`` (device.gpu_facts())."""
    lines = [f"Paddle {facts['paddle']}: " + (f"GPU build, CUDA {facts['cuda']}, cuDNN {facts['cudnn']}"
                                              if facts["cuda_build"] else "CPU build (no CUDA)")]
    if facts["cuda_archs"]:
        lines.append("GPU code for: " + ", ".join(f"sm_{a}" for a in facts["cuda_archs"]))
    for i, gpu in enumerate(facts["gpus"]):
        major, minor = gpu["capability"]
        amp = devices.amp_dtypes(gpu["capability"])
        lines.append(f"GPU {i}: {gpu['name']}, compute capability {major}.{minor}, {gpu['memory_mb']:,} MB; "
                     f"AMP: {', '.join(amp) if amp else 'none (Paddle would train in fp32)'}")
    if facts["cuda_build"] and facts.get("probed"):
        lines.append("test convolution on GPU 0: " + (facts["conv_error"] or "ok"))
    if facts["shm_mb"] is not None:
        lines.append(f"/dev/shm: {facts['shm_mb']:,} MB" + (" (small: the DataLoader will use pipes)"
                                                            if facts["shm_mb"] < 512 else ""))
    lines.append(f"CPU threads (OMP_NUM_THREADS): {facts['cpu_threads']}")
    if facts.get("cpu_kernels"):
        lines.append(f"CPU training kernels: {facts['cpu_kernels']}")
    if "cpu_bf16" in facts:
        on_cpu = " with --device cpu" if facts["gpus"] else ""  # a GPU box trains and evaluates on its GPU
        limit = facts.get("isa_limit")
        no_units = "no: this CPU has neither amx_bf16 nor avx512_bf16"
        lines.append(f"CPU bf16 training (--amp --amp-dtype bfloat16{on_cpu}): " + (
            no_units if not facts["cpu_bf16"] else
            f"no: {limit[0]}={limit[1]} keeps oneDNN from its AVX512 code" if limit and limit[1].upper() in
            devices.NO_BF16_ISAS else
            f"yes, on {facts['cpu_bf16']}, but {devices.SLOW_BF16}; train in fp32" if facts.get("cpu_kernels_ok") and
            facts.get("cpu_bf16_slower") else
            f"yes, on {facts['cpu_bf16']}" if facts.get("cpu_kernels_ok") else
            "no: it runs on our CPU kernels (cpu_kernels/), which are not available here"))
        no_gelu = "" if facts["paddle"].startswith("2.") else \
            " (not the fast networks on Paddle 3.x, whose GELU it cannot hold: drop --inference for them)"
        lines.append(f"CPU bf16 inference (eval.py --inference --precision bf16{on_cpu}): " + (
            f"yes, on {facts['cpu_bf16']}{no_gelu}" if facts["cpu_bf16"] else no_units))
    return lines


def verdict(facts, require_gpu=False):
    """(exit status, last line)."""
    problem = devices.gpu_problem(facts)
    if problem:
        return 1, f"error: {problem}"
    if not facts["gpus"]:
        if require_gpu:
            return 1, ("error: no usable GPU: this is a CPU build of Paddle; install a GPU build "
                       "(README, GPU set-up), then run python check_env.py")
        return 0, "no GPU: training runs on the CPU"
    return 0, f"ready: training runs on GPU 0 ({facts['gpus'][0]['name']})"


def main(argv=None):
    parser = errors.ArgumentParser(description="Check what this Paddle can train on.")
    parser.add_argument("--require-gpu", action="store_true", help="exit 1 when there is no usable GPU")
    args = parser.parse_args(argv)
    facts = devices.gpu_facts(probe=True)
    if facts["gpus"]:  # training runs on the GPU: the CPU operators are built by the first --device cpu run
        facts["cpu_kernels"] = "not built here (training runs on GPU 0; the first run with --device cpu builds them)"
        op = None
    else:
        op, why_not = cpu_kernels.load()
        facts["cpu_kernels"] = "ours (cpu_kernels/)" if op else f"Paddle's ({why_not})"
    flags = devices.cpu_flags()
    facts["cpu_kernels_ok"], facts["cpu_bf16"] = op is not None, devices.cpu_bf16_units(flags)
    facts["cpu_bf16_slower"] = devices.bf16_slower_than_fp32(flags, devices.cpu_info("vendor_id"))
    facts["isa_limit"] = devices.onednn_isa_limit()
    print("\n".join(report(facts)))
    status, last = verdict(facts, args.require_gpu)
    if status:
        sys.exit(last)
    print(last)
    return facts


if __name__ == "__main__":
    main()
