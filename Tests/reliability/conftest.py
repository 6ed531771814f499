"""Fixtures for the reliability tests (issue 6): the integration suite's fixtures (private
dbus-daemon, SoftHSM token copies, pincached, fault shim, clients), plus what measuring
needs. Each reliability test file may add its own helpers; shared ones go here.

Environment, besides Tests/integration/conftest.py's:
  RELIABILITY=ci|long   size of every test (default ci: a few minutes on 2 cores)
  RELIABILITY_OUT=DIR   figures are also appended as JSON lines to DIR/figures.jsonl
"""

import importlib.util
import sys
from pathlib import Path

_INTEGRATION = Path(__file__).resolve().parents[1] / "integration"
sys.path.insert(0, str(_INTEGRATION))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Loaded under its own name: "conftest" is this module's name too.
_spec = importlib.util.spec_from_file_location("pincache_integration_conftest", _INTEGRATION / "conftest.py")
_integration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_integration)
sys.modules["pincache_integration_conftest"] = _integration

# Fixtures and the CI hook (a skip is a failure under CI=true) become this conftest's own.
for _name in dir(_integration):
    if not _name.startswith("__"):
        globals().setdefault(_name, getattr(_integration, _name))
