"""Shared test setup: import path, interpreter switch, skip marks, seeding."""

import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path

# The helpers' `from tests.x import ...` is served from this folder whether or not the
# repo root is on sys.path (`python -m pytest` puts it there, the `pytest` script does not).
ROOT = Path(__file__).resolve().parent.parent
if "tests" not in sys.modules:
    _spec = importlib.machinery.ModuleSpec("tests", None, is_package=True)
    _spec.submodule_search_locations = [str(ROOT / "tests")]
    sys.modules["tests"] = importlib.util.module_from_spec(_spec)

import pytest  # noqa: E402
import torch  # noqa: E402

# The Triton interpreter must be chosen before any @triton.jit function is defined,
# i.e. before lorakern.kernels is imported. With no GPU, every kernel test runs in it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One GEMM tile instead of autotuning each of the suite's many small shapes
    # (kernels/forward.gemm_configs); `lorakern check` and the benchmarks autotune.
    os.environ.setdefault("LORAKERN_AUTOTUNE", "0")

# Tests build every model from a config: nothing may reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

_CUDA_REASON = "needs a CUDA GPU"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=_CUDA_REASON)


def pytest_collection_modifyitems(config, items):
    """Mark every requires_cuda test `cuda`: on a lent GPU, `pytest -m cuda` runs just
    the tests that never run in CI, first."""
    for item in items:
        if any(m.kwargs.get("reason") == _CUDA_REASON for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
# The device kernel tests run on: CUDA when present, else CPU through the interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def backend_device(backend: str) -> str:
    """Where a backend's test tensors live: Triton's on KERNEL_DEVICE, the reference's on CPU."""
    return KERNEL_DEVICE if backend == "triton" else "cpu"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Test shapes are tiny: intra-op threads only add barrier waits (tens of ms per
    call on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Fixtures of the model / adapter / interop modules.


@pytest.fixture
def switches(monkeypatch):
    """Set lorakern's environment switches for one test, as if set before import:
    ``switches(LORAKERN_BACKEND="reference", TRITON_INTERPRET=None)`` sets (None: unsets)
    the variables and re-reads lorakern.settings (ValueError on a bad value, settings
    unchanged). Both the environment and the settings are restored after the test."""
    from lorakern import settings

    saved = {name: getattr(settings, name) for name in settings.read({})}

    def apply(**env):
        for name, value in env.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        settings.reload()

    yield apply
    for name, value in saved.items():
        setattr(settings, name, value)


@pytest.fixture(scope="module")
def quiet_warnings():
    """transformers and PEFT warn about tiny random configs; those tests do not check
    warnings (they opt in with pytestmark = pytest.mark.usefixtures("quiet_warnings"))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def llama():
    """A tiny random-weight Llama built from a config (no download)."""
    pytest.importorskip("transformers")
    from tests.test_model_helpers import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2():
    """A tiny random-weight GPT-2 (Conv1D projections) built from a config."""
    pytest.importorskip("transformers")
    from tests.test_model_helpers import tiny_gpt2

    return tiny_gpt2()
