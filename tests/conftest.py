import os
import sys

# Tests import the project's modules from the repository root, as a notebook would.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_settings  # noqa: E402,F401  (first: the CPU settings, before paddle loads)
