"""GEMM, grouped-GEMM and small-kernel physics on one accelerator: tiles, waves and launch floors.

A GEMM ``C[m, n] = A[m, k] @ B[k, n]`` runs as output tiles of ``gemm_tile_m x gemm_tile_n``; one
SM (one MXU on a TPU) computes one tile at a time, so the tiles run in waves of ``sm_count``
(NVIDIA, "Matrix Multiplication Background User's Guide": tile and wave quantization). Padding a
dimension to whole tiles wastes work: ``m = 129`` rows cost two 128-row tiles. Its time is

    max(compute, memory) + kernel_overhead

- **compute**: waves x the FLOPs of one (padded) tile at one unit's share of the achievable peak
  (``peak x efficiency / sm_count``). With fewer tiles than units the kernel splits the
  contraction over the idle units (split-K), so a partial single wave costs its fraction; beyond
  one wave, ``gemm_scheduler: waves`` rounds up to whole waves and ``stream_k`` (a persistent
  kernel that spreads the last wave's work, CUTLASS stream-K) keeps the fraction.
- **memory**: bytes of A, B and C over the achievable HBM bandwidth. Small ``m`` (decode) is
  weight-read bound.
- **kernel_overhead**: the fixed launch, prologue, pipeline fill and tail every kernel pays; it
  is the floor of small memory-bound kernels (norms, router softmax/top-k, casts).

A grouped (MoE) GEMM runs every active expert's tiles in one kernel: each expert pads its own
tokens to whole tile rows, all experts' tiles share the waves, and every active expert's weights
are read once. A profile without ``sm_count`` gets the plain roofline (FLOPs over achievable
peak) and no floor, as before this module.

All functions are pure: sizes in, seconds out.
"""

from __future__ import annotations

import math

import numpy as np

from moesim.spec.hardware import DeviceSpec

__all__ = ["padded", "gemm_tiles", "waves", "matmul_efficiency", "gemm_time", "grouped_gemm_time",
           "grouped_gemm_times",
           "attention_head_dim_factor",
           "memory_time", "overlapped_compute_slowdown"]


def padded(size: float, tile: int) -> float:
    """``size`` rounded up to a whole number of ``tile`` (0 stays 0).

    >>> padded(129, 128), padded(64, 128), padded(7.5, 1)
    (256, 128, 7.5)
    """
    if tile <= 1 or size <= 0:
        return size
    return math.ceil(size / tile) * tile


def gemm_tiles(m: float, n: float, device: DeviceSpec) -> float:
    """Output tiles of an ``[m, n]`` result: ceil(m / tile_m) x ceil(n / tile_n)."""
    return (padded(m, device.gemm_tile_m) / device.gemm_tile_m
            * padded(n, device.gemm_tile_n) / device.gemm_tile_n)


def waves(tiles: float | np.ndarray, device: DeviceSpec) -> float | np.ndarray:
    """Waves of ``sm_count`` tiles (each element of an array); below one wave, split-K spreads
    the tiles over every unit."""
    full = np.asarray(tiles, dtype=float) / device.sm_count
    if device.gemm_scheduler != "stream_k":
        full = np.where(full <= 1.0, full, np.ceil(full - 1e-9))
    return float(full) if full.ndim == 0 else full


def matmul_efficiency(device: DeviceSpec, dtype: str, grouped: bool = False) -> float:
    """Fraction of ``dtype``'s peak a GEMM reaches: dense ``matmul_efficiency`` (FP8:
    ``fp8_matmul_efficiency``); grouped GEMMs ``grouped_gemm_efficiency``, scaled for FP8 by the
    same FP8-to-dense ratio."""
    dense = device.matmul_efficiency
    eff = (device.grouped_gemm_efficiency or dense) if grouped else dense
    if dtype == "fp8" and device.fp8_matmul_efficiency:
        eff *= device.fp8_matmul_efficiency / dense
    return eff


def _tiled_compute(tiles: float | np.ndarray, k: float, device: DeviceSpec, dtype: str,
                   efficiency: float) -> float | np.ndarray:
    """Seconds of ``tiles`` output tiles (each element of an array), each contracting ``k``
    (padded to tile_k) and paying the tile's fixed prologue and epilogue
    (``gemm_tile_overhead``).

    >>> d = DeviceSpec(name="x", peak_flops={"bf16": 8.0}, memory=1.0, memory_bandwidth=1.0,
    ...                sm_count=2, gemm_tile_m=1, gemm_tile_n=2, gemm_tile_overhead=0.5)
    >>> float(_tiled_compute(2, 2, d, "bf16", 1.0))  # 1 wave: 8 FLOPs at 4 FLOP/s, + 0.5 s
    2.5
    """
    tile_flops = 2.0 * device.gemm_tile_m * device.gemm_tile_n * padded(k, device.gemm_tile_k)
    per_unit = device.flops(dtype) * efficiency / device.sm_count
    return waves(tiles, device) * (tile_flops / per_unit + device.gemm_tile_overhead)


def memory_time(nbytes: float, device: DeviceSpec, kernels: int = 1,
                efficiency: float | None = None, overhead: float | None = None) -> float:
    """Memory-bound kernels: ``nbytes`` over achievable HBM bandwidth plus ``kernels`` floors.

    ``efficiency`` replaces the device's ``memory_efficiency``, ``overhead`` its
    ``kernel_overhead`` (a measured profile's own figures).

    >>> d = DeviceSpec(name="x", peak_flops={"bf16": 1.0}, memory=1.0, memory_bandwidth=10.0,
    ...                kernel_overhead=0.5)
    >>> memory_time(20.0, d, kernels=2)
    3.0
    """
    if nbytes <= 0 and kernels <= 0:
        return 0.0
    eff = device.memory_efficiency if efficiency is None else efficiency
    floor = device.kernel_overhead if overhead is None else overhead
    return max(nbytes, 0.0) / (device.memory_bandwidth * eff) + kernels * floor


def gemm_time(m: float, n: float, k: float, device: DeviceSpec, dtype: str, *,
              a_bytes: float, b_bytes: float, c_bytes: float,
              efficiency: float | None = None, memory_efficiency: float | None = None,
              batch: int = 1) -> float:
    """Seconds of one GEMM ``[m, k] @ [k, n]`` (``batch`` of them in one kernel: a BMM);
    0 for an empty one.

    ``a_bytes``, ``b_bytes``, ``c_bytes``: bytes per element of the input, the weight and the
    output (read once from and written once to HBM). ``efficiency`` replaces
    :func:`matmul_efficiency`, ``memory_efficiency`` the device's.

    >>> d = DeviceSpec(name="x", peak_flops={"bf16": 4.0}, memory=1.0, memory_bandwidth=1e9,
    ...                sm_count=2, gemm_tile_m=2, gemm_tile_n=2)
    >>> gemm_time(3, 2, 1, d, "bf16", a_bytes=0, b_bytes=0, c_bytes=0)  # 2 tiles, 1 wave
    4.0
    """
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    eff = matmul_efficiency(device, dtype) if efficiency is None else efficiency
    if device.sm_count:
        compute = float(_tiled_compute(batch * gemm_tiles(m, n, device), k, device, dtype, eff))
    else:
        compute = 2.0 * batch * m * n * k / (device.flops(dtype) * eff)
    nbytes = batch * (m * k * a_bytes + k * n * b_bytes + m * n * c_bytes)
    memory = memory_time(nbytes, device, kernels=0, efficiency=memory_efficiency)
    return max(compute, memory) + device.kernel_overhead


def grouped_gemm_time(tokens: np.ndarray, n: float, k: float, device: DeviceSpec, dtype: str, *,
                      a_bytes: float, b_bytes: float, c_bytes: float) -> float:
    """Seconds of one grouped GEMM: expert ``e`` multiplies ``[tokens[e], k] @ [k, n]``.

    ``tokens: [experts]`` rows per expert (0 = idle: no tiles, no weight read). Each active
    expert pads its rows to whole tiles; all tiles share the waves; each active expert's
    ``k x n`` weights are read once. Efficiencies: ``grouped_gemm_efficiency`` and
    ``grouped_gemm_memory_efficiency`` (falling back to the dense ones).
    """
    t = np.asarray(tokens, dtype=float).reshape(1, -1)
    return float(grouped_gemm_times(t, n, k, device, dtype, a_bytes=a_bytes, b_bytes=b_bytes,
                                    c_bytes=c_bytes)[0])


def grouped_gemm_times(tokens: np.ndarray, n: float, k: float, device: DeviceSpec, dtype: str, *,
                       a_bytes: float, b_bytes: float, c_bytes: float) -> np.ndarray:
    """float[devices]: :func:`grouped_gemm_time` of each row of ``tokens: [devices, experts]``
    (one grouped GEMM per device, priced at once).

    >>> d = DeviceSpec(name="x", peak_flops={"bf16": 4.0}, memory=1.0, memory_bandwidth=1e9,
    ...                sm_count=2, gemm_tile_m=2, gemm_tile_n=2)
    >>> grouped_gemm_times(np.array([[3.0, 0.0], [1.0, 1.0], [0.0, 0.0]]), 2, 1, d, "bf16",
    ...                    a_bytes=0, b_bytes=0, c_bytes=0).tolist()  # 2 tiles each, 1 wave
    [4.0, 4.0, 0.0]
    """
    t = np.asarray(tokens, dtype=float)
    t = np.where(t > 0, t, 0.0)
    active = (t > 0).sum(axis=1)
    if n <= 0 or k <= 0:
        return np.zeros(t.shape[0])
    eff = matmul_efficiency(device, dtype, grouped=True)
    mem_eff = device.grouped_gemm_memory_efficiency or device.memory_efficiency
    rows = t.sum(axis=1)
    if device.sm_count:
        row_tiles = np.ceil(t / device.gemm_tile_m) if device.gemm_tile_m > 1 else t
        tiles = row_tiles.sum(axis=1) * gemm_tiles(1.0, n, device)
        compute = _tiled_compute(tiles, k, device, dtype, eff)
    else:
        compute = 2.0 * rows * n * k / (device.flops(dtype) * eff)
    nbytes = active * k * n * b_bytes + rows * (k * a_bytes + n * c_bytes)
    memory = nbytes / (device.memory_bandwidth * mem_eff)
    return np.where(active > 0, np.maximum(compute, memory) + device.kernel_overhead, 0.0)


REFERENCE_HEAD_DIM = 128   # the head dim the profiles' fused-attention efficiencies were measured at


def attention_head_dim_factor(qk: float, v: float, device: DeviceSpec, *,
                              forward_share: float = 1.0) -> float:
    """Factor on a fused attention kernel's efficiency for query/key head dim ``qk`` and value
    head dim ``v``, against the 128/128 heads its efficiency was measured at.

    Per score element a flash-attention pass does ``F`` matmul FLOPs on the tensor cores (the
    forward ``2 qk + 2 v``: QK^T and PV; the backward ``6 qk + 4 v``: S again, dP, dV, dK, dQ)
    and one exponential on the special-function units, which do not overlap fully, so a pass
    reaches ``F / (F + r)`` of its matmul rate, ``r`` = matmul peak / special-function rate
    (H100: 989 / 3.9 = 254; FlashAttention-3, Shah et al. 2024, sec. 3: at head dim 128 the
    exponentials take half the matmuls' cycles). The factor is that fraction over its value at
    128/128, per pass, mixed by time: ``forward_share`` of the reference time is the forward
    (1 for an inference forward). 1 without a ``special_function_rate``.

    >>> d = DeviceSpec(name="x", peak_flops={"bf16": 254.0}, memory=1.0, memory_bandwidth=1.0,
    ...                special_function_rate=1.0)
    >>> round(attention_head_dim_factor(64, 64, d), 4)     # (256/510) / (512/766)
    0.751
    """
    if not device.special_function_rate:
        return 1.0
    r = device.flops("bf16") / device.special_function_rate
    ref = REFERENCE_HEAD_DIM

    def ratio(flops: float, reference: float) -> float:
        return (flops / (flops + r)) / (reference / (reference + r))

    forward = ratio(2 * qk + 2 * v, 4 * ref)
    if forward_share >= 1.0:
        return forward
    backward = ratio(6 * qk + 4 * v, 10 * ref)
    return 1.0 / (forward_share / forward + (1.0 - forward_share) / backward)


def overlapped_compute_slowdown(device: DeviceSpec) -> float:
    """Factor by which compute slows while an expert-parallel communication kernel holds
    ``comm_sm_fraction`` of the SMs: the GEMMs keep ``1 - fraction`` of them.

    >>> d = DeviceSpec(name="x", peak_flops={"bf16": 1.0}, memory=1.0, memory_bandwidth=1.0,
    ...                comm_sm_fraction=0.25)
    >>> overlapped_compute_slowdown(d)
    1.3333333333333333
    """
    return 1.0 / (1.0 - device.comm_sm_fraction)


def comm_kernel_bandwidth(device: DeviceSpec) -> float:
    """Bytes/s an SM-driven communication kernel (DeepEP's normal kernels) moves over NVLink per
    direction: its ``comm_sm_fraction`` of the SMs times ``comm_sm_bandwidth`` each; 0 when the
    profile gives no per-SM rate (no limit).

    >>> d = DeviceSpec(name="x", peak_flops={"bf16": 1.0}, memory=1.0, memory_bandwidth=1.0,
    ...                sm_count=100, comm_sm_fraction=0.2, comm_sm_bandwidth=5e9)
    >>> comm_kernel_bandwidth(d)
    100000000000.0
    """
    if not device.comm_sm_bandwidth or not device.sm_count or not device.comm_sm_fraction:
        return 0.0
    return device.comm_sm_fraction * device.sm_count * device.comm_sm_bandwidth
