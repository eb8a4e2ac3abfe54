import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# comet_ml (the comet extra) would mirror every MLflow run of the tests into ./.cometml-runs; it reads this at import
os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
# On a machine without CUDA the Triton kernels run in Triton's interpreter. triton.jit reads this when a kernel is
# defined, i.e. when ftkit.kernels is first imported, which any test module importing ftkit.train does at collection:
# so it is set here, before every test module, not in the kernel tests alone.
if "TRITON_INTERPRET" not in os.environ:
    import torch
    if not torch.cuda.is_available(): os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    "GPU tests skip where there is no CUDA device (CI never has one)."
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def root():
    return ROOT
