"""Stages 1 and 2: the environment with measured ceilings at the model's shapes, and every attention backend's output
and LSE against an fp64 reference computed on the same device, plus the LSE merge against the fp64 union.

Only torch and `ispa` are imported here, so these stages run on a machine that lacks the streaming stage's wheels.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from collections.abc import Callable

import torch

from bench.attention import device_name, median_seconds
from bench.suite.recorder import Recorder, StageSkipped
from bench.suite.scales import Scale
from ispa import attention_with_lse, merge_attention
from ispa.attention_backends import available_backends

NVIDIA_SMI_FIELDS = (
    "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,memory.used,memory.total,"
    "power.draw,pstate"
)
WHEELS = ("diffusers", "transformers", "huggingface_hub", "librosa", "soxr", "flash_attn")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> dict[str, str] | str:
    """The card's state from nvidia-smi (clocks, temperature, memory in use), or why it could not be read."""
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={NVIDIA_SMI_FIELDS}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as err:
        return f"nvidia-smi not readable: {type(err).__name__}"
    values = [v.strip() for v in done.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(NVIDIA_SMI_FIELDS.split(","), values, strict=False))


def environment(device: torch.device) -> dict[str, object]:
    cuda = device.type == "cuda"
    info: dict[str, object] = {
        "device": device_name(device),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "attention_backends": available_backends(device),
        "packages": {name: _version(name) for name in WHEELS},
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        info |= {
            "capability": list(torch.cuda.get_device_capability(device)),
            "multiprocessors": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "nvidia_smi": nvidia_smi(),
        }
    return info


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    return median_seconds(fn, device, warmup=2, repeats=repeats)


def ceilings(recorder: Recorder, device: torch.device, scale: Scale) -> None:
    """Copy bandwidth; bf16 and FP8 GEMM at the FFN's shape; fp32 and TF32 GEMM at the statistics' shape (Aᵀ A with A
    [queries, D]); fp64 GEMM and Cholesky at D. Each is recorded as soon as it is measured; each helper frees its
    tensors on return."""
    gen = torch.Generator(device).manual_seed(0)
    _copy_bandwidth(recorder, device, scale, gen)
    _model_gemms(recorder, device, scale, gen)
    _statistics_gemm(recorder, device, scale, gen)
    _fp64(recorder, device, scale, gen)


def _copy_bandwidth(recorder: Recorder, device: torch.device, scale: Scale, gen: torch.Generator) -> None:
    source = torch.empty(scale.copy_bytes // 4, device=device).uniform_(generator=gen)
    target = torch.empty_like(source)
    seconds = _timed(lambda: target.copy_(source), device, scale.repeats)
    recorder.record("copy_bytes_per_s", 2 * source.nbytes / seconds)  # bytes read + written


def _model_gemms(recorder: Recorder, device: torch.device, scale: Scale, gen: torch.Generator) -> None:
    m, k, n = scale.queries, scale.dim, scale.ffn_dim
    flop = 2 * m * k * n
    half = (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )  # the CPU's bf16 GEMM is not what runs there
    a = torch.randn(m, k, device=device, generator=gen).to(half)
    b = torch.randn(n, k, device=device, generator=gen).to(half)
    label = str(half).removeprefix("torch.")
    recorder.record(f"gemm_{label}_flop_per_s", flop / _timed(lambda: a @ b.T, device, scale.repeats))
    try:
        recorder.record("gemm_fp8_flop_per_s", flop / _timed(_fp8_gemm(a, b), device, scale.repeats))
    except (RuntimeError, NotImplementedError) as err:
        recorder.record("gemm_fp8_flop_per_s", None)
        recorder.record("gemm_fp8_error", f"{type(err).__name__}: {str(err).splitlines()[0]}")


def _statistics_gemm(recorder: Recorder, device: torch.device, scale: Scale, gen: torch.Generator) -> None:
    activations = torch.randn(scale.queries, scale.dim, device=device, generator=gen)
    flop = 2 * scale.queries * scale.dim**2
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for label, tf32 in (("fp32", False), ("tf32", True)):
            if tf32 and device.type != "cuda":
                recorder.record("gemm_tf32_statistics_flop_per_s", None)  # CPUs have no TF32
                continue
            torch.backends.cuda.matmul.allow_tf32 = tf32
            rate = flop / _timed(lambda: activations.T @ activations, device, scale.repeats)
            recorder.record(f"gemm_{label}_statistics_flop_per_s", rate)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _fp64(recorder: Recorder, device: torch.device, scale: Scale, gen: torch.Generator) -> None:
    x = torch.randn(scale.queries, scale.dim, device=device, generator=gen, dtype=torch.float64)
    spd = x.T @ x / scale.queries + torch.eye(scale.dim, device=device, dtype=torch.float64)
    recorder.record(
        "gemm_fp64_flop_per_s", 2 * scale.dim**3 / _timed(lambda: spd @ spd, device, scale.repeats)
    )
    recorder.record(
        "cholesky_fp64_seconds", _timed(lambda: torch.linalg.cholesky_ex(spd), device, scale.repeats)
    )


def _fp8_gemm(a: torch.Tensor, b: torch.Tensor) -> Callable[[], torch.Tensor]:
    """`_scaled_mm` as the FP8 linears call it (per-tensor scales, bf16 out); raises where no kernel exists."""
    fp8 = torch.float8_e4m3fn
    a8, b8 = a.to(fp8), b.to(fp8)
    one = torch.ones((), device=a.device)

    def run() -> torch.Tensor:
        return torch._scaled_mm(a8, b8.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    run()  # fail here, before timing, where the device has no kernel
    return run


def attention_accuracy(recorder: Recorder, device: torch.device, scale: Scale) -> None:
    """Each installed backend at each Lk, q/k amplitude 1 and 3: out relative error and LSE max abs error against
    fp64 (the `math` backend on fp64 copies, on the same device); then local + history merged against the union."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = available_backends(device)
    if not backends:
        raise StageSkipped(f"no attention backend runs on {device.type}")
    gen = torch.Generator(device).manual_seed(1)

    def tokens(n: int, amplitude: float = 1.0) -> torch.Tensor:
        shape = (1, n, scale.heads, scale.head_dim)
        return (amplitude * torch.randn(shape, device=device, generator=gen)).to(dtype)

    results: dict[str, dict[str, object]] = {}
    for amplitude in (1.0, 3.0):
        q = tokens(scale.queries, amplitude)
        for keys in scale.key_lengths:
            k, v = tokens(keys, amplitude), tokens(keys)
            want_out, want_lse = attention_with_lse(q.double(), k.double(), v.double(), backend="math")
            for backend in backends:
                label = f"{backend}_lk{keys}_amp{amplitude:g}"
                try:
                    out, lse = attention_with_lse(q, k, v, backend=backend)
                    results[label] = _errors(out, lse, want_out, want_lse)
                except (RuntimeError, ValueError) as err:
                    results[label] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
                recorder.record(label, results[label])
            del want_out, want_lse, k, v
            if device.type == "cuda":
                torch.cuda.empty_cache()

    q = tokens(scale.queries)
    local_k, local_v = tokens(scale.local_keys), tokens(scale.local_keys)
    hist_k, hist_v = tokens(scale.history_keys), tokens(scale.history_keys)
    union_k, union_v = torch.cat([local_k, hist_k], 1).double(), torch.cat([local_v, hist_v], 1).double()
    want_out, want_lse = attention_with_lse(q.double(), union_k, union_v, backend="math")
    out, lse = merge_attention(
        *attention_with_lse(q, local_k, local_v), *attention_with_lse(q, hist_k, hist_v)
    )
    recorder.record("merge_vs_fp64_union", _errors(out, lse, want_out, want_lse))


def _errors(
    out: torch.Tensor, lse: torch.Tensor, want_out: torch.Tensor, want_lse: torch.Tensor
) -> dict[str, float]:
    out64, lse64 = out.double(), lse.double()
    return {
        "out_relative_error": float((out64 - want_out).norm() / want_out.norm()),
        "lse_max_abs_error": float((lse64 - want_lse).abs().max()),
        "finite": bool(torch.isfinite(out64).all() and torch.isfinite(lse64).all()),
    }
