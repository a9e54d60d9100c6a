"""Hardware profiles: what one accelerator can compute and store, and how fast its links are.

A profile is a YAML file in ``hardware_profiles/`` (datasheet figures, each with its source) or one
written by ``moesim calibrate`` (measured figures, plus the measured tables under ``calibration``).
Numbers are read once into SI units: FLOP/s, bytes, bytes/s, seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moesim.errors import ScenarioError
from moesim.spec.fields import build, read_yaml, spec_field
from moesim.spec.limits import check_path_text

__all__ = ["DeviceSpec", "RingProtocol", "LinkSpec", "NodeSpec", "HardwareProfile", "load_hardware",
           "DTYPES", "dtype_bytes"]

# Bytes per element of the number formats moesim knows.
DTYPES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "fp4": 0.5}


def dtype_bytes(dtype: str) -> float:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ScenarioError(f"unknown dtype {dtype!r} (allowed: {', '.join(DTYPES)})") from None


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One accelerator (or a CPU socket standing in for one)."""

    name: str
    kind: Literal["gpu", "tpu", "cpu"] = "gpu"
    peak_flops: dict[str, float] = spec_field(unit="flops", doc="dense peak FLOP/s per dtype")
    memory: float = spec_field(unit="bytes", gt=0, doc="HBM capacity")
    memory_bandwidth: float = spec_field(unit="bandwidth", gt=0, doc="HBM bandwidth")
    # Fraction of peak a large, well-shaped GEMM reaches, and of HBM bandwidth a streaming kernel
    # reaches: one value per hardware class, from a microbenchmark or vendor figure (see source).
    matmul_efficiency: float = spec_field(1.0, gt=0, max=1.0)
    memory_efficiency: float = spec_field(1.0, gt=0, max=1.0)
    # Reserved by the framework/driver (CUDA context, allocator fragmentation).
    reserved_memory: float = spec_field(0.0, unit="bytes", min=0)
    # ---- kernel shape physics (moesim.kernels); the defaults give the plain roofline ----
    # GEMMs are cut into tile_m x tile_n output tiles (contraction padded to tile_k) that run in
    # waves over ``sm_count`` units (SMs; MXUs on a TPU). 0 = no tile model: plain roofline.
    sm_count: int = spec_field(0, min=0, max=1 << 20, doc="SMs (GPU) or MXUs (TPU) per device")
    gemm_tile_m: int = spec_field(1, min=1, max=4096, doc="GEMM output tile rows (tokens)")
    gemm_tile_n: int = spec_field(1, min=1, max=4096, doc="GEMM output tile columns")
    gemm_tile_k: int = spec_field(1, min=1, max=4096, doc="contraction padded to a multiple")
    # "waves": tiles run in whole waves (a partial last wave costs a full one); "stream_k":
    # a persistent kernel spreads the last wave's work over all SMs (CUTLASS stream-K).
    gemm_scheduler: Literal["waves", "stream_k"] = "waves"
    # Fixed time per output tile beside its math: before a tile's main loop the kernel fills
    # its shared-memory pipeline, after it the tile is written out. A short contraction (an
    # expert's down projection, k = its FFN width) therefore runs further below peak than a
    # long one, and an FP8 tile (half the math time) more so than a BF16 one (0 = not modelled).
    gemm_tile_overhead: float = spec_field(0.0, unit="time", min=0,
                                           doc="per-tile prologue + epilogue time")
    # Fixed time every kernel pays (launch, prologue, pipeline fill, tail), seconds.
    kernel_overhead: float = spec_field(0.0, unit="time", min=0)
    # FP8 GEMMs: fraction of the FP8 peak they reach (null = matmul_efficiency); grouped FP8
    # GEMMs reach grouped_gemm_efficiency scaled by the same FP8/dense ratio.
    fp8_matmul_efficiency: float | None = spec_field(None, gt=0, max=1.0)
    # Grouped (MoE) GEMM: fraction of peak FLOP/s and of HBM bandwidth it reaches (null = the
    # dense matmul_efficiency / memory_efficiency).
    grouped_gemm_efficiency: float | None = spec_field(None, gt=0, max=1.0)
    grouped_gemm_memory_efficiency: float | None = spec_field(None, gt=0, max=1.0)
    # Fused attention: prefill/training fraction of peak (null = matmul_efficiency), decode
    # KV-cache streaming fraction of HBM bandwidth (null = memory_efficiency), MLA absorbed
    # decode fraction of peak (null = attention_efficiency).
    attention_efficiency: float | None = spec_field(None, gt=0, max=1.0)
    # Inference prefill runs the forward alone (null = attention_efficiency, the training mix).
    prefill_attention_efficiency: float | None = spec_field(None, gt=0, max=1.0)
    decode_attention_efficiency: float | None = spec_field(None, gt=0, max=1.0)
    mla_decode_efficiency: float | None = spec_field(None, gt=0, max=1.0)
    # Special-function (exp) results per second: a fused attention kernel's softmax runs on
    # them beside the matmuls, so heads narrower than the 128 the attention efficiencies were
    # measured at run further below peak (0 = not modelled: one efficiency for every head dim).
    special_function_rate: float = spec_field(0.0, unit="flops", min=0)
    # Fraction of the SMs an expert-parallel communication kernel holds while it overlaps
    # compute (DeepEP-style kernels run on SMs); compute sharing the device slows down.
    comm_sm_fraction: float = spec_field(0.0, min=0, max=0.9)
    # Bytes/s one SM of such a kernel pushes to peers over NVLink (DeepEP's normal kernels copy
    # tokens with SM load/stores, not copy engines): with comm_sm_fraction of the SMs the kernel
    # moves at most their sum per direction (0 = not limited).
    comm_sm_bandwidth: float = spec_field(0.0, unit="bandwidth", min=0)
    # Share of a link's achievable rate (bandwidth x efficiency, what NCCL reaches) such a
    # kernel reaches over NVLink when its SMs are not the limit: its chunked queues between
    # ranks cost some of the link (1 = none).
    comm_link_efficiency: float = spec_field(1.0, gt=0, max=1.0)
    source: str = ""

    def __post_init__(self) -> None:
        for dtype, value in self.peak_flops.items():
            if dtype not in DTYPES:
                raise ScenarioError(f"unknown dtype {dtype!r} (allowed: {', '.join(DTYPES)})",
                                    field=f"device.peak_flops.{dtype}")
            if value <= 0:
                raise ScenarioError(f"{value} must be > 0", field=f"device.peak_flops.{dtype}")
        if not self.peak_flops:
            raise ScenarioError("at least one dtype is required (e.g. bf16: 989 TFLOPS)",
                                field="device.peak_flops")
        if self.gemm_tile_overhead > 0 and (
                not self.sm_count or self.gemm_tile_m * self.gemm_tile_n == 1):
            raise ScenarioError("a time per GEMM output tile needs a tile model: set sm_count "
                                "and gemm_tile_m / gemm_tile_n (or leave it 0)",
                                field="device.gemm_tile_overhead")

    def flops(self, dtype: str) -> float:
        """Peak dense FLOP/s for ``dtype`` (:meth:`peak_dtype`'s figure)."""
        return self.peak_flops[self.peak_dtype(dtype)]

    def peak_dtype(self, dtype: str) -> str:
        """The ``peak_flops`` entry that prices ``dtype``: its own, else bf16, fp16, fp32, else
        the fastest the profile gives."""
        for candidate in (dtype, "bf16", "fp16", "fp32"):
            if candidate in self.peak_flops:
                return candidate
        return max(self.peak_flops, key=self.peak_flops.__getitem__)


@dataclass(frozen=True, kw_only=True)
class RingProtocol:
    """One regime of a ring collective (NCCL's LL/LL128/Simple protocols and their algorithms):
    a ring all-gather, reduce-scatter or all-reduce over ``n`` ranks takes
    ``fixed + steps * per_step + volume / (efficiency * bandwidth)`` in this regime (``steps``:
    ``n - 1``, twice that for an all-reduce); the library runs the fastest regime for the size."""

    name: str = spec_field(doc="label, e.g. LL128 or Simple")
    fixed: float = spec_field(unit="time", min=0, doc="seconds per collective")
    per_step: float = spec_field(0.0, unit="time", min=0, doc="seconds per ring step")
    efficiency: float = spec_field(gt=0, max=1.0, doc="fraction of the link's line rate")


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """A class of link, per device and per direction (e.g. one GPU's NVLink or its NIC)."""

    kind: str = spec_field(doc="nvlink, infiniband, ethernet, pcie, ici, loopback, emulated")
    bandwidth: float = spec_field(unit="bandwidth", gt=0, doc="per device, per direction")
    latency: float = spec_field(0.0, unit="time", min=0)
    # Fraction of line rate that collectives achieve on large messages (protocol overhead), from a
    # benchmark: the ceiling of the message-size curve below.
    efficiency: float = spec_field(1.0, gt=0, max=1.0)
    # Message-size curve (opt-in; 0 = no size dependence): a message of s bytes moves at
    # efficiency * s / (s + half_efficiency_size) of line rate, i.e. it occupies the link for
    # (s + half_efficiency_size) / (efficiency * bandwidth) seconds (alpha-beta per message).
    half_efficiency_size: float = spec_field(0.0, unit="bytes", min=0,
                                             doc="message size at half the large-message rate")
    # Fixed cost of one collective (or communication kernel) over this link class: launch,
    # handshake and completion signalling, paid once per collective, not per message.
    collective_overhead: float = spec_field(0.0, unit="time", min=0,
                                            doc="fixed seconds per collective")
    # Ring collectives (all-gather, reduce-scatter, all-reduce) on this class, fitted on a
    # measured size sweep: the fastest regime per size replaces latency, size curve and fixed
    # cost for them (empty: they use those). See :class:`RingProtocol`.
    ring_protocols: tuple[RingProtocol, ...] = ()
    source: str = ""

    @property
    def effective_bandwidth(self) -> float:
        """Large-message bytes/s (the size curve's ceiling)."""
        return self.bandwidth * self.efficiency


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    devices_per_node: int = spec_field(8, min=1)


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """A device, its links and its node shape; optionally measured tables from calibration."""

    name: str
    description: str = ""
    device: DeviceSpec
    links: dict[str, LinkSpec] = field(default_factory=dict)
    node: NodeSpec = field(default_factory=NodeSpec)
    calibration: dict[str, Any] | None = None
    path: str = ""

    def __post_init__(self) -> None:
        allowed = {"scale_up", "scale_out", "ici"}
        for name in self.links:
            if name not in allowed:
                raise ScenarioError(f"unknown link class {name!r} (allowed: "
                                    f"{', '.join(sorted(allowed))})", field=f"links.{name}")

    def link(self, name: str) -> LinkSpec:
        try:
            return self.links[name]
        except KeyError:
            raise ScenarioError(f"profile {self.name!r} has no {name!r} link (it has: "
                                f"{', '.join(self.links) or 'none'})", source=self.path) from None


def profile_dirs() -> list[Path]:
    """Where shipped profiles live: inside the wheel, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent.parent
    return [here / "_data" / "hardware_profiles", here.parent / "hardware_profiles"]


def find_profile(name_or_path: str, relative_to: Path | None = None) -> Path:
    """Resolve a profile name ("h100-sxm") or a path (absolute, or relative to the scenario)."""
    as_file = name_or_path if name_or_path.endswith((".yaml", ".yml")) else f"{name_or_path}.yaml"
    check_path_text(as_file, source=None, field=None)   # NUL, surrogates, OS length limits
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        for base in ([relative_to] if relative_to else []) + [Path.cwd()]:
            path = candidate if candidate.is_absolute() else base / candidate
            if path.exists():
                return path
        raise ScenarioError(f"hardware profile file {name_or_path!r} not found")
    for directory in profile_dirs():
        path = directory / f"{name_or_path}.yaml"
        if path.exists():
            return path
    known = sorted({p.stem for d in profile_dirs() if d.exists() for p in d.glob("*.yaml")})
    raise ScenarioError(f"unknown hardware profile {name_or_path!r} (shipped: {', '.join(known)}; "
                        "or give a path to a .yaml file)")


def load_hardware(name_or_path: str, relative_to: Path | None = None) -> HardwareProfile:
    """Load and validate a hardware profile by shipped name or by path."""
    path = find_profile(name_or_path, relative_to)
    data = read_yaml(path)
    if isinstance(data, dict):
        data = {**data, "path": str(path)}
    # Profiles written by the calibration suite (a `calibration` section) hold SI numbers.
    measured = isinstance(data, dict) and data.get("calibration") is not None
    return build(HardwareProfile, data, source=str(path), bare_si=measured)
