import pytest
import torch

from fedgov.config import Config
from fedgov.engine.flower import backend_config
from fedgov.task import resolve_device


def test_auto_on_cpu_machine_gives_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend_config(Config())["client_resources"]["num_gpus"] == 0.0
    assert resolve_device("auto").type == "cpu"


def test_auto_on_gpu_machine_gives_each_client_a_gpu_fraction(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = Config().replace(**{"runtime.client_gpu_fraction": 0.2})
    assert backend_config(cfg)["client_resources"]["num_gpus"] == 0.2
    assert resolve_device("auto").type == "cuda"


def test_cpu_forced_on_gpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = Config().replace(**{"runtime.device": "cpu"})
    assert backend_config(cfg)["client_resources"]["num_gpus"] == 0.0


def test_cuda_without_gpu_is_an_error_not_a_silent_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="runtime.device"):
        resolve_device("cuda")
