"""Test set-up: the tests folder is importable (shared helpers such as hf_oracle)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
