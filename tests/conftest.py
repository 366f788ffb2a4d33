import os
import sys
from pathlib import Path

# The hubs are unreachable here: fail fast instead of retrying. Helpers live beside the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
