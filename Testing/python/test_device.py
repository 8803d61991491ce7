"""Device choice, CPU threads, autocast precision and the GPU-OOM fallback to the CPU.

CUDA is simulated where it is absent (a fake ``torch.device("cuda")`` plus a raised
``torch.OutOfMemoryError``); the tests marked ``needs_cuda`` run on a GPU machine.
"""

from __future__ import annotations

import os
import weakref

import pytest
import torch

from medalign.core import device as dev
from medalign.core.errors import MedAlignError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_accelerator = pytest.mark.skipif(
    torch.cuda.is_available() or dev._mps_available(), reason="this machine has a GPU"
)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------- resolve_device


@no_accelerator
def test_auto_is_cpu_without_gpu():
    assert dev.resolve_device() == torch.device("cpu")
    assert dev.resolve_device("AUTO") == torch.device("cpu")


def test_cpu_is_always_available():
    assert dev.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_requested_without_cuda_is_one_sentence(name):
    with pytest.raises(MedAlignError) as info:
        dev.resolve_device(name)
    message = str(info.value)
    assert "no CUDA GPU" in message and "--device cpu" in message and "\n" not in message


@pytest.mark.parametrize("name", ["tpu", "gpu0", "cuda:x", "auto:1"])
def test_unknown_device_names(name):
    with pytest.raises(MedAlignError, match="Unknown device"):
        dev.resolve_device(name)


def test_empty_device_means_auto():
    # an unset option arrives as "" and must behave like "auto", not fail
    assert dev.resolve_device("") == dev.resolve_device("auto")


# ----------------------------------------------------------------- threads


def test_threads_default_to_available_cpus(monkeypatch, restore_threads):
    monkeypatch.delenv("MEDALIGN_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    assert dev.configure_cpu_threads() == dev.available_cpus() == torch.get_num_threads()


def test_medalign_threads_wins(monkeypatch, restore_threads):
    monkeypatch.setenv("MEDALIGN_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert dev.configure_cpu_threads() == 1 == torch.get_num_threads()


def test_omp_num_threads_is_left_to_torch(monkeypatch, restore_threads):
    monkeypatch.delenv("MEDALIGN_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert dev.configure_cpu_threads() == 1 == torch.get_num_threads()


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_bad_medalign_threads(monkeypatch, value):
    monkeypatch.setenv("MEDALIGN_THREADS", value)
    with pytest.raises(MedAlignError, match="MEDALIGN_THREADS"):
        dev.configure_cpu_threads()


def test_available_cpus_within_affinity():
    assert 1 <= dev.available_cpus() <= len(os.sched_getaffinity(0))


# ----------------------------------------------------------------- precision


def test_autocast_auto_on_cpu_is_float32_noop():
    a = torch.ones(4, 4)
    with dev.autocast(torch.device("cpu")):
        assert (a @ a).dtype == torch.float32
    assert dev.resolve_precision(torch.device("cpu")) == torch.float32


def test_explicit_bf16_on_cpu_autocasts():
    a = torch.ones(4, 4)
    with dev.autocast(torch.device("cpu"), "bf16"):
        out = a @ a
    assert out.dtype == torch.bfloat16
    assert (a @ a).dtype == torch.float32  # nothing leaks out of the context


@pytest.mark.parametrize(
    "alias, dtype",
    [("float32", torch.float32), ("fp32", torch.float32), ("bfloat16", torch.bfloat16), ("half", torch.float16)],
)
def test_precision_aliases(alias, dtype):
    assert dev.resolve_precision(torch.device("cpu"), alias) == dtype


def test_unknown_precision():
    with pytest.raises(MedAlignError, match="Unknown precision 'int8'"):
        dev.resolve_precision(torch.device("cpu"), "int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_auto_precision_for_cuda_without_native_bf16_is_fp16():
    assert dev.resolve_precision(torch.device("cuda")) == torch.float16


# ----------------------------------------------------------------- OOM fallback


def test_is_oom():
    assert dev.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert dev.is_oom(RuntimeError("CUDA error: out of memory"))
    assert dev.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert dev.is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not dev.is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not dev.is_oom(ValueError("out of memory"))
    assert not dev.is_oom(MemoryError())


class _Held:
    """Stands in for GPU tensors referenced from the failing call's frame."""


def test_cuda_oom_falls_back_to_cpu_once():
    calls: list[torch.device] = []
    logs: list[str] = []
    held: list[weakref.ref] = []

    def fn(device: torch.device) -> str:
        calls.append(device)
        if device.type == "cuda":
            activations = _Held()
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        # the failed attempt's frame (and what it held) is gone before the retry starts
        assert held and held[0]() is None
        return "done on " + device.type

    assert dev.run_with_fallback(fn, torch.device("cuda"), log=logs.append) == "done on cpu"
    assert [d.type for d in calls] == ["cuda", "cpu"]
    assert len(logs) == 1 and "Out of GPU memory on cuda" in logs[0] and "CPU" in logs[0]


def test_other_errors_are_not_retried():
    calls: list[torch.device] = []

    def fn(device):
        calls.append(device)
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        dev.run_with_fallback(fn, torch.device("cuda"), log=lambda m: None)
    assert len(calls) == 1


def test_cpu_oom_is_not_retried():
    calls: list[torch.device] = []

    def fn(device):
        calls.append(device)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory")

    with pytest.raises(RuntimeError):
        dev.run_with_fallback(fn, torch.device("cpu"), log=lambda m: None)
    assert len(calls) == 1


def test_success_runs_once_without_logging():
    logs: list[str] = []
    assert dev.run_with_fallback(lambda d: d.type, torch.device("cpu"), log=logs.append) == "cpu"
    assert logs == []


# ----------------------------------------------------------------- real CUDA (GPU machine)


@needs_cuda
def test_real_cuda_auto_and_explicit():
    assert dev.resolve_device().type == "cuda"
    assert dev.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(MedAlignError, match="only"):
        dev.resolve_device(f"cuda:{torch.cuda.device_count()}")


@needs_cuda
def test_real_cuda_autocast_uses_half_width():
    device = torch.device("cuda")
    a = torch.ones(64, 64, device=device)
    with dev.autocast(device):
        out = a @ a
    expected = torch.bfloat16 if dev._native_bf16() else torch.float16
    assert out.dtype == expected
    with dev.autocast(device, "float32"):
        assert (a @ a).dtype == torch.float32


@needs_cuda
def test_real_cuda_oom_falls_back_and_frees_memory():
    device = torch.device("cuda")
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(device)
    logs: list[str] = []

    def fn(d: torch.device) -> str:
        keep = torch.ones(1024, 1024, device=d)  # memory the failed attempt holds
        if d.type == "cuda":
            total = torch.cuda.get_device_properties(d).total_memory
            torch.empty(int(total * 4), dtype=torch.uint8, device=d)  # cannot fit: real OOM
        return f"{keep.device.type}:{float(keep.sum()):.0f}"

    assert dev.run_with_fallback(fn, device, log=logs.append) == f"cpu:{1024 * 1024}"
    assert len(logs) == 1
    assert torch.cuda.memory_allocated(device) == baseline


# ----------------------------------------------------------------- --device on the command line


@pytest.mark.parametrize("command", [["screen", "ct.nii.gz", "--out", "o"], ["batch", "cases", "--out", "o"],
                                     ["eval", "--data", "d", "--out", "o"], ["train", "--data", "d", "--out", "o.safetensors"]])
def test_every_torch_command_accepts_a_gpu_number(command):
    """``cuda:N`` used to be refused by four copies of ``choices=[auto, cpu, cuda, mps]``."""
    from medalign.cli.dispatch import build_parser

    for name in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert build_parser().parse_args([*command, "--device", name]).device == name


@pytest.mark.parametrize("name, phrase", [("tpu", "Unknown device 'tpu' (use auto, cpu, cuda, cuda:N or mps)"),
                                          ("cuda:x", "Unknown device 'cuda:x'")])
def test_a_misspelt_device_is_one_sentence_before_any_work(name, phrase, tmp_path, capsys):
    from medalign.cli import main

    missing = tmp_path / "missing.nii.gz"  # would be "does not exist" if the command ran
    assert main(["screen", str(missing), "--out", str(tmp_path / "o"), "--device", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medalign: error: ") and phrase in err and err.count("\n") == 1
    assert "does not exist" not in err and not (tmp_path / "o").exists()


def test_an_absent_gpu_number_is_one_sentence(tmp_path, capsys):
    from medalign.cli import main

    number = torch.cuda.device_count() if torch.cuda.is_available() else 1
    assert main(["screen", str(tmp_path / "x.nii.gz"), "--out", str(tmp_path / "o"), "--device", f"cuda:{number}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medalign: error: ") and err.count("\n") == 1
    expected = f"CUDA device {number} was requested but only" if torch.cuda.is_available() else "sees no CUDA GPU"
    assert expected in err
