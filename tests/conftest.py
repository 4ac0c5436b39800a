import os
import sys

# Tests import the project's modules from the repository root, as a notebook would.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The suite runs on the CPU, also on a GPU machine (its bit-exact and operator-log checks
# are CPU facts): Paddle sees no GPU unless RESNET_TESTS_ON_GPU=1 asks for it. Set before
# paddle loads, and inherited by the scripts the tests start.
if os.environ.get("RESNET_TESTS_ON_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
import cpu_settings  # noqa: E402,F401  (first: the CPU settings, before paddle loads)
