import os
import sys
from pathlib import Path

# The hubs are unreachable here: fail fast instead of retrying. Helpers live beside the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run under the interpreter on machines without CUDA; it must be set before they are imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))
