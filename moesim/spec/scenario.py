"""A scenario: one model, on one cluster, with one parallel layout, workload, routing and placement.

Scenarios are YAML files (see ``scenarios/``). :func:`load_scenario` reads one into frozen
dataclasses, resolving the model and the hardware profile by name, and checks every field and the
relations between fields (parallel degrees against the device count, top-k against experts).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from moesim.errors import ScenarioError
from moesim.spec.cluster import ClusterSpec
from moesim.spec.fields import build, read_yaml, relative_file, spec_field
from moesim.spec.hardware import DTYPES, HardwareProfile, load_hardware
from moesim.spec.limits import MAX_DEPTH, MAX_DEVICES, check_name, load_yaml_text
from moesim.spec.model import ModelSpec

__all__ = ["Parallelism", "Workload", "Precision", "RoutingSpec", "PlacementSpec",
           "CommunicationSpec", "MemorySpec", "SimulationSpec", "OutputSpec", "FaultSpec",
           "Scenario", "load_scenario", "scenario_from_mapping", "apply_overrides",
           "mtp_blocks", "mtp_held", "draft_passes", "without_drafts", "tokens_per_sequence",
           "output_tokens_per_sequence", "pipeline_end_layers", "micro_batches",
           "interleaving_problem",
           "dualpipe_problem", "context_parallel_problem", "expert_tensor_parallel_problem",
           "replicated_dispatch_problem",
           "scenario_warnings"]

Dtype = Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4"]


@dataclass(frozen=True, kw_only=True)
class Parallelism:
    """Parallel degrees. tp * cp * pp * dp = devices; EP is carved out of dp * cp * tp
    (Megatron-Core, DeepSeek). Ranks are ordered tensor-parallel fastest, then context-parallel,
    data-parallel, pipeline (Megatron-Core's default order)."""

    tp: int = spec_field(1, min=1, max=1 << 20, doc="tensor parallel (inside a node)")
    cp: int = spec_field(1, min=1, max=1 << 20,
                         doc="context parallel: each sequence's tokens split over cp ranks "
                             "(ring attention; training and prefill)")
    pp: int = spec_field(1, min=1, max=1 << 20, doc="pipeline stages")
    dp: int = spec_field(1, min=1, max=1 << 20, doc="data parallel replicas of the dense part")
    ep: int = spec_field(1, min=1, max=1 << 20, doc="expert parallel group size (divides dp * cp * tp)")
    vp: int = spec_field(1, min=1, max=1024, doc="virtual pipeline chunks per device (interleaved 1F1B)")
    # Expert tensor parallelism: every expert's FFN split over the etp ranks of the TP group
    # (vLLM's and SGLang's MoE without expert parallelism; Megatron-Core's
    # --expert-tensor-parallel-size, which defaults to tp): 1 (whole experts, the default) or
    # a divisor of tp; each EP group takes one rank of ep such groups (ep * etp | dp * cp * tp).
    etp: int = spec_field(1, min=1, max=1 << 20,
                          doc="expert tensor parallel: each expert split over etp TP ranks (divides tp)")
    zero_stage: int = spec_field(1, min=0, max=3, doc="ZeRO stage of the optimizer state")
    # Megatron-Core's --sequence-parallel: between the TP-split parts each rank holds 1/tp of
    # its TP group's tokens (activations, norms, router). Either way the TP-split parts run on
    # the group's tokens and each rank routes its 1/tp share into the MoE layer (all of them
    # under etp), so a token reaches the experts once per group.
    sequence_parallel: bool = False
    # Megatron-Core's --account-for-embedding-in-pipeline-split / --account-for-loss-in-
    # pipeline-split: the embedding (first stage) and the LM head with its loss (last stage, one
    # more per multi-token-prediction module) count as one layer each when layers are split.
    account_for_embedding: bool = False
    account_for_loss: bool = False
    # Pipeline schedule (training): Megatron's 1F1B (interleaved with vp > 1), or DeepSeek-V3's
    # bidirectional DualPipe (each device holds two stages, one per direction: 2x parameters).
    schedule: Literal["1f1b", "dualpipe"] = "1f1b"

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def dense_dp(self) -> int:
        """Ranks of a stage holding the same dense parameters (one per data- and context-
        parallel rank): the group their gradients are reduced over and ZeRO shards them over
        (Megatron-Core's data-parallel-with-context-parallel group)."""
        return self.dp * self.cp


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What one step processes. Training: global_batch sequences of seq_len tokens."""

    mode: Literal["training", "prefill", "decode"] = "training"
    global_batch: int = spec_field(min=1, max=1 << 30, doc="sequences per step (all DP replicas)")
    seq_len: int = spec_field(min=1, max=1 << 24, doc="tokens per sequence (prefill/training) ")
    micro_batch: int = spec_field(1, min=1, max=1 << 24, doc="sequences per micro-batch per DP rank")
    context_len: int = spec_field(0, min=0, max=1 << 24, doc="decode: tokens already in the KV cache")
    # Speculative decoding with the model's multi-token-prediction module as the draft model
    # (DeepSeek-V3 serving): each decode step verifies the previous step's drafts with the main
    # model (1 + speculative_tokens query tokens per sequence) and the MTP module drafts the
    # next ones (speculative_tokens passes over one token per sequence). Each draft token is
    # accepted with probability acceptance_rate given the ones before it (DeepSeek-V3 report,
    # sec. 5.4.3: 85-90% for the second token).
    speculative_tokens: int = spec_field(0, min=0, max=16,
                                         doc="decode: MTP draft tokens verified per step")
    acceptance_rate: float = spec_field(0.0, min=0, max=1,
                                        doc="decode: chance each draft token is accepted")


@dataclass(frozen=True, kw_only=True)
class Precision:
    compute: Dtype = "bf16"
    weights: Dtype = "bf16"
    activations: Dtype = "bf16"   # what activations flow between kernels in
    # What training caches for the backward, when narrower than ``activations`` (DeepSeek-V3
    # caches FP8, report sec. 3.3.2): memory counts it, and each block pays a cast into it in the
    # forward and back out of it in the backward. None: ``activations``.
    saved_activations: Dtype | None = None
    gradients: Dtype = "fp32"
    master_weights: bool = True
    optimizer_state_bytes: float = spec_field(8.0, min=0, max=64, doc="bytes per parameter (Adam: 2 x fp32)")
    dispatch: Dtype = "bf16"
    combine: Dtype = "bf16"
    kv_cache: Dtype = "bf16"
    # How FP8 GEMMs scale: one scale per tensor (Transformer Engine's delayed scaling), or per
    # 1x128 activation tile and 128x128 weight block (DeepSeek-V3, DeepGEMM). Measured tables
    # (aiconfigurator import) of the recipe's own kind serve first.
    fp8_scaling: Literal["tensor", "block"] = "tensor"


@dataclass(frozen=True, kw_only=True)
class RoutingSpec:
    distribution: Literal["uniform", "zipf", "dirichlet", "hot", "trace", "balanced",
                          "balanced_random"] = "uniform"
    zipf_s: float = spec_field(1.0, min=0, max=100)
    dirichlet_alpha: float = spec_field(1.0, gt=0)
    hot_experts: int = spec_field(0, min=0, max=1 << 16)
    hot_fraction: float = spec_field(0.5, min=0, max=1)
    coactivation_groups: int = spec_field(0, min=0, max=1 << 16)
    coactivation_strength: float = spec_field(0.0, min=0, max=1000)
    node_limit: int = spec_field(0, min=0, max=1 << 16, doc="max nodes per token (DeepSeek-V3: 4); 0 = off")
    trace: str = spec_field("", path=True, doc="routing trace file (see docs/trace_format.md)")
    max_tokens_per_source: int = spec_field(256, min=1, max=1 << 16, doc="sampled tokens per device and layer")


@dataclass(frozen=True, kw_only=True)
class PlacementSpec:
    policy: Literal["contiguous", "round_robin", "random", "eplb", "eplb_global", "moesim",
                    "file"] = "contiguous"
    file: str = spec_field("", path=True, doc="plan file (policy: file)")
    redundant_experts: int = spec_field(0, min=0, max=1 << 20, doc="extra expert slots per EP group")
    # Which replica of a replicated expert a token goes to (moesim.placement.placement
    # REPLICA_RULES): least_loaded = the engines' rule (a replica on the sender's own GPU, else
    # its own node, else the least loaded); even = an equal share to each replica on the
    # sender's node (all replicas if none there); null = the plan file's own rule (policy:
    # file), else least_loaded.
    replica_rule: Literal["least_loaded", "even"] | None = None


@dataclass(frozen=True, kw_only=True)
class CommunicationSpec:
    # The MoE layer's dispatch and combine (moesim.traffic): an all-to-all algorithm, the
    # all-gather + reduce-scatter of data-parallel attention, or replicated: the EP group
    # inside the TP group, whose ranks already hold every token (no movement; the TP
    # all-reduce combines), as serving engines run EP over the TP ranks.
    alltoall: Literal["direct", "hierarchical", "deepep_normal", "deepep_ll", "allgather",
                      "replicated"] = "direct"
    overlap: Literal["none", "shared_expert", "two_batch"] = "none"
    dp_overlap: bool = spec_field(True, doc="gradient reduce overlaps the last backward pass")
    dp_algorithm: Literal["ring", "tree", "hierarchical"] = "ring"
    # ZeRO-3 / FSDP: when a block's gathered parameters are freed. after_forward: re-gathered
    # for its backward (FSDP2's default); after_backward: kept from forward to backward; auto:
    # after_backward under pipeline parallelism, else after_forward (torchtitan-style stacks).
    zero3_reshard: Literal["auto", "after_forward", "after_backward"] = "auto"
    # Context parallelism's attention (parallelism.cp > 1): ring, each rank's keys and values
    # passed around the CP group behind the attention steps (Megatron-Core / Transformer
    # Engine cp_comm_type p2p, the default); all_to_all, an all-to-all of the queries, keys and
    # values into heads before the attention core and of its output back (DeepSpeed-Ulysses,
    # Transformer Engine's a2a), exposed; all_gather, the keys and values of the whole
    # sequence all-gathered before the core (Transformer Engine's all_gather, Llama 3), exposed.
    cp_algorithm: Literal["ring", "all_to_all", "all_gather"] = "ring"


# What selective recomputation can re-run in the backward (Megatron-Core's recompute_modules):
# the attention core, the block's norms, MLA's query/KV up-projections (DeepSeek-V3), the MoE
# activation (SwiGLU), the shared experts, a dense block's MLP, the whole MoE layer (router,
# dispatch, experts, shared experts, combine: its all-to-alls run again).
RecomputeModule = Literal["core_attn", "layernorm", "mla_up_proj", "moe_act", "shared_experts",
                          "mlp", "moe"]


@dataclass(frozen=True, kw_only=True)
class MemorySpec:
    # none: keep every activation; full: re-run each block's forward before its backward;
    # selective: re-run only ``recompute_modules`` (default: the attention core, Megatron's
    # --recompute-granularity selective), storing half the activations.
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_modules: tuple[RecomputeModule, ...] = ()
    on_overflow: Literal["error", "warn"] = "error"
    alltoall_buffer_factor: float = spec_field(2.0, min=0, max=100, doc="buffers per expected bytes")


@dataclass(frozen=True, kw_only=True)
class SimulationSpec:
    mode: Literal["aggregated", "full"] = "aggregated"
    # Flow-level all-to-all: completions closer than rtol x elapsed time are merged into one
    # rate recomputation (0 = exact; 1e-2 keeps the all-to-all time within ~2%, 20x faster).
    network_rtol: float = spec_field(1e-2, min=0, max=0.1)
    max_seconds: float = spec_field(600.0, gt=0, doc="refuse scenarios estimated to take longer")
    max_memory: float = spec_field(16 * 2**30, unit="bytes", gt=0,
                                   doc="refuse scenarios estimated to need more memory")


@dataclass(frozen=True, kw_only=True)
class FaultSpec:
    """A device or link that fails (slowdown 0) or runs ``slowdown`` times slower, from ``at``."""

    kind: Literal["device", "link"]
    device: int = spec_field(-1, min=-1, doc="device rank (kind: device)")
    link: tuple[str, ...] = ()
    slowdown: float = spec_field(0.0, min=0, doc="0 = failed; >= 1 = that many times slower")
    at: float = spec_field(0.0, unit="time", min=0, doc="when it strikes, from the step start")

    def __post_init__(self) -> None:
        if 0 < self.slowdown < 1:
            raise ScenarioError(f"slowdown={self.slowdown} must be 0 (failed) or >= 1",
                                field="faults.slowdown")


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    trace: bool = True
    trace_links: int = spec_field(8, min=0, max=1000, doc="busiest links shown as trace tracks")


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    description: str = ""
    seed: int = spec_field(0, min=0, max=2**63 - 1)
    model: ModelSpec
    cluster: ClusterSpec
    hardware: HardwareProfile
    parallelism: Parallelism = field(default_factory=Parallelism)
    workload: Workload
    precision: Precision = field(default_factory=Precision)
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    placement: PlacementSpec = field(default_factory=PlacementSpec)
    communication: CommunicationSpec = field(default_factory=CommunicationSpec)
    memory: MemorySpec = field(default_factory=MemorySpec)
    simulation: SimulationSpec = field(default_factory=SimulationSpec)
    faults: tuple[FaultSpec, ...] = ()
    outputs: OutputSpec = field(default_factory=OutputSpec)
    source: str = ""

    def __post_init__(self) -> None:
        check_name(self.name, source=self.source or None, field="name")

    @property
    def devices_per_node(self) -> int:
        return self.cluster.devices_per_node or self.hardware.node.devices_per_node

    @property
    def num_devices(self) -> int:
        if self.cluster.topology == "explicit":
            return len(self.cluster.devices)
        if self.cluster.topology == "torus":
            count = 1
            for d in self.cluster.torus_dims:
                count *= d
            return count
        return self.cluster.nodes * self.devices_per_node

    def with_values(self, **changes: Any) -> Scenario:
        return replace(self, **changes)


_TOP_FIELDS = ("name", "description", "seed", "model", "cluster", "parallelism", "workload",
               "precision", "routing", "placement", "communication", "memory", "simulation",
               "faults", "outputs", "sweep", "search")


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Read, resolve and validate a scenario YAML file.

    ``overrides`` are ``key.path=value`` strings (value parsed as YAML) applied before validation.
    """
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ScenarioError("a scenario must be a YAML mapping with fields "
                            f"{', '.join(_TOP_FIELDS)}", source=str(path))
    data = apply_overrides(data, overrides or [], source=str(path))
    return scenario_from_mapping(data, source=str(path), base_dir=path.parent)


def apply_overrides(data: dict, overrides: list[str], *, source: str) -> dict:
    """Return a copy of ``data`` with ``a.b.c=value`` overrides applied (value read as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ScenarioError(f"override {item!r} must look like key.path=value", source=source)
        key, raw = item.split("=", 1)
        value = load_yaml_text(raw, source=source, field=key.strip())
        node = data
        parts = key.strip().split(".")
        if len(parts) > MAX_DEPTH or not all(parts):
            raise ScenarioError(f"override key {key[:60]!r} must be a dotted field path of at "
                                f"most {MAX_DEPTH} non-empty parts, e.g. parallelism.ep",
                                source=source)
        for part in parts[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and part == "model":
                child = node[part] = {"base": child}
            if not isinstance(child, dict):
                raise ScenarioError(f"cannot set {key}: {part} is not a mapping", source=source,
                                    field=key)
            node = child
        node[parts[-1]] = value
    return data


def scenario_from_mapping(data: dict, *, source: str, base_dir: Path | None = None,
                          bare_si: bool = False) -> Scenario:
    """Build a Scenario from a parsed mapping (the body of :func:`load_scenario`).

    ``bare_si=True`` accepts plain SI numbers in fields with a unit (mappings made by code, such
    as :mod:`moesim.validation`'s layer scenarios); YAML written by people needs units.
    """
    from moesim.spec.models import load_model  # models module resolves shipped names

    unknown = [k for k in data if k not in _TOP_FIELDS]
    if unknown:
        raise ScenarioError(f"unknown field {unknown[0]!r} (allowed: {', '.join(_TOP_FIELDS)})",
                            source=source, field=str(unknown[0]))
    for required in ("name", "model", "cluster", "workload"):
        if required not in data:
            raise ScenarioError("required field is missing", source=source, field=required)
    model = load_model(data["model"], source=source, relative_to=base_dir, field_path="model")
    cluster = build(ClusterSpec, data["cluster"], source=source, path="cluster", bare_si=bare_si)
    try:
        hardware = load_hardware(cluster.hardware, relative_to=base_dir)
    except ScenarioError as exc:
        if exc.source:  # the profile file itself is broken: its own path is the right name
            raise
        raise ScenarioError(str(exc), source=source, field="cluster.hardware") from None
    # A scenario may carry the sections `moesim sweep` and `moesim search` read; run ignores them.
    body = {k: v for k, v in data.items() if k not in ("model", "cluster", "sweep", "search")}
    body.update(model=model, cluster=cluster, hardware=hardware, source=source)
    scenario = build(Scenario, body, source=source, bare_si=bare_si)
    trace = scenario.routing.trace
    if trace and base_dir is not None and not Path(trace).is_absolute():
        # the scenario's folder first, then the working directory, as for a model or profile
        routing = replace(scenario.routing, trace=str(relative_file(trace, base_dir)))
        scenario = replace(scenario, routing=routing)
    try:
        _check_relations(scenario, source)
    except ScenarioError as exc:
        exc.between_fields = True
        raise
    return scenario


def expert_tensor_parallel_problem(tp: int, etp: int, ep: int, ffn: int,
                                   expert_ranks: int | None = None) -> str | None:
    """The rule that stops ``etp`` > 1 (every expert's FFN split over ``etp`` consecutive
    ranks of the TP group), or None: ``etp`` divides ``tp`` (each rank computes its slice of
    its experts on the tokens they are routed, gathered over its ``etp`` ranks), an expert FFN
    that splits evenly, and EP groups of ranks at the same position of ``ep`` such groups
    (Megatron-Core's expert layout, ETP fastest, MoE Parallel Folding's ETP < TP included):
    ``ep * etp`` must divide the ``expert_ranks`` = dp * cp * tp ranks of a stage."""
    if tp % etp:
        return (f"etp={etp} must divide tp={tp}: experts split over ranks of one "
                "tensor-parallel group")
    if ffn % etp:
        return f"expert_ffn_size={ffn} does not split over etp={etp} ranks"
    if expert_ranks is not None and expert_ranks % (ep * etp):
        return (f"ep * etp = {ep * etp} must divide dp * cp * tp = {expert_ranks} (each EP "
                "group takes one rank of etp TP groups)")
    return None


def replicated_dispatch_problem(tp: int, ep: int, sequence_parallel: bool, etp: int = 1
                                ) -> str | None:
    """The rule that stops ``communication.alltoall: replicated`` (no dispatch: every rank of
    an EP group already holds its tokens), or None: the EP group must lie inside one TP group
    (``ep`` divides ``tp``; TP ranks are adjacent and EP groups are carved from them in order),
    whose ranks hold the same tokens only without sequence parallelism."""
    if tp % ep:
        return (f"replicated needs each EP group inside one TP group: ep={ep} must divide "
                f"tp={tp} (with ep > tp the groups' tokens differ: use an all-to-all)")
    if sequence_parallel:
        return ("replicated needs every TP rank to hold the group's tokens, which sequence "
                "parallelism shards (set sequence_parallel: false, or use an all-to-all)")
    if etp > 1 and ep > 1:
        return (f"replicated with etp={etp} and ep={ep}: expert tensor parallelism takes each "
                "EP group from several TP groups, whose tokens differ (use an all-to-all)")
    return None


def context_parallel_problem(cp: int, tp: int, seq_len: int, heads: int, algorithm: str
                             ) -> tuple[str, str] | None:
    """``(field, why)`` when ``cp`` > 1 ranks cannot split a sequence, or None: it must split
    into 2 * cp equal chunks (the causal load balancing of Megatron-Core and Transformer
    Engine: rank r holds chunks r and 2 cp - 1 - r), and the all-to-all variant splits each
    tensor-parallel rank's heads over the CP group."""
    if seq_len % (2 * cp):
        return "workload.seq_len", (f"seq_len={seq_len} must split into 2 * cp = {2 * cp} equal "
                                    "chunks (causal load balancing)")
    if algorithm == "all_to_all" and (heads % tp or (heads // tp) % cp):
        return "communication.cp_algorithm", (
            f"cp_algorithm all_to_all splits each tensor-parallel rank's {heads / tp:g} attention "
            f"heads over cp={cp} ranks: cp must divide num_heads / tp (or use cp_algorithm: "
            "ring)")
    return None


def _check_context_parallel(s: Scenario, source: str) -> None:
    """cp > 1 splits each sequence's tokens over cp ranks: training or prefill only, and
    :func:`context_parallel_problem`'s rules."""
    par, wl = s.parallelism, s.workload
    if wl.mode == "decode":
        raise ScenarioError(f"cp={par.cp}: context parallelism splits a sequence's tokens; decode "
                            "runs one new token per sequence (use cp: 1)", source=source,
                            field="parallelism.cp")
    problem = context_parallel_problem(par.cp, par.tp, wl.seq_len, s.model.attention.num_heads,
                                       s.communication.cp_algorithm)
    if problem is not None:
        field, why = problem
        raise ScenarioError(why, source=source, field=field)


def _check_relations(s: Scenario, source: str) -> None:
    """Cross-field checks: things each field alone cannot know."""
    par, wl, m = s.parallelism, s.workload, s.model
    devices = s.num_devices
    if devices > MAX_DEVICES:
        raise ScenarioError(f"{devices:,} devices is more than the {MAX_DEVICES:,} moesim "
                            "simulates; use fewer nodes or smaller torus dims", source=source,
                            field="cluster")
    if s.cluster.topology == "torus" and devices % s.devices_per_node:
        raise ScenarioError(f"{s.devices_per_node} chips per host must divide the torus's "
                            f"{devices} chips", source=source, field="cluster.devices_per_node")
    if par.world != devices:
        names, degrees = ("tp * cp * pp * dp", (par.tp, par.cp, par.pp, par.dp)) if par.cp > 1 \
            else ("tp * pp * dp", (par.tp, par.pp, par.dp))
        raise ScenarioError(f"{names} = {' * '.join(map(str, degrees))} = {par.world} must "
                            f"equal the cluster's {devices} devices", source=source,
                            field="parallelism")
    if (par.dense_dp * par.tp) % par.ep:
        what = "dp * cp * tp" if par.cp > 1 else "dp * tp"
        raise ScenarioError(f"ep={par.ep} must divide {what} = {par.dense_dp * par.tp} (EP is "
                            "carved out of the data-parallel devices of a stage)", source=source,
                            field="parallelism.ep")
    if par.cp > 1:
        _check_context_parallel(s, source)
    if s.communication.alltoall == "replicated" and (problem := replicated_dispatch_problem(
            par.tp, par.ep, par.sequence_parallel, par.etp)) is not None:
        raise ScenarioError(problem, source=source, field="communication.alltoall")
    if par.etp > 1 and (problem := expert_tensor_parallel_problem(
            par.tp, par.etp, par.ep, m.expert_ffn_size, par.dense_dp * par.tp)) is not None:
        raise ScenarioError(problem, source=source, field="parallelism.etp")
    slots = m.num_experts + s.placement.redundant_experts
    most = m.num_experts * (par.ep - 1)
    if s.placement.redundant_experts > most:
        raise ScenarioError(f"{s.placement.redundant_experts} must be <= num_experts x (ep - 1) = "
                            f"{most}: beyond that every device already holds every expert",
                            source=source, field="placement.redundant_experts")
    if slots % par.ep:
        raise ScenarioError(f"num_experts + redundant_experts = {slots} must be a multiple of "
                            f"ep={par.ep} (equal expert slots per device)", source=source,
                            field="placement.redundant_experts")
    problem = interleaving_problem(par.pp, par.vp)
    if problem is not None:
        raise ScenarioError(f"vp={par.vp} {problem} (set vp: 1, or pp > 1)", source=source,
                            field="parallelism.vp")
    # With the ends counted as layers a virtual stage may hold only the embedding or the loss.
    units = m.num_layers + sum(pipeline_end_layers(s))
    if units < par.pp * par.vp:
        counted = "" if units == m.num_layers else f" (+ {units - m.num_layers} for the ends)"
        raise ScenarioError(f"pp * vp = {par.pp * par.vp} exceeds the model's {m.num_layers} "
                            f"layers{counted}", source=source, field="parallelism.pp")
    if par.schedule == "dualpipe":
        _check_dualpipe(s, source)
    prec = s.precision
    saved = prec.saved_activations
    if saved is not None and DTYPES[saved] > DTYPES[prec.activations]:
        raise ScenarioError(f"saved_activations={saved} is wider than activations="
                            f"{prec.activations}; training caches activations in their own dtype "
                            "or a narrower one", source=source, field="precision.saved_activations")
    if par.tp > s.devices_per_node:
        raise ScenarioError(f"tp={par.tp} must fit in one node of {s.devices_per_node} devices",
                            source=source, field="parallelism.tp")
    per_rank = wl.global_batch / par.dp
    if wl.global_batch % par.dp or per_rank % wl.micro_batch:
        raise ScenarioError(f"global_batch={wl.global_batch} must split into dp={par.dp} "
                            f"replicas of whole micro-batches of {wl.micro_batch}", source=source,
                            field="workload.global_batch")
    if wl.speculative_tokens and wl.mode != "decode":
        raise ScenarioError(f"speculative decoding drafts tokens in decode, not in {wl.mode}",
                            source=source, field="workload.speculative_tokens")
    if wl.speculative_tokens and not s.model.mtp_modules:
        raise ScenarioError(f"speculative_tokens drafts with the model's multi-token-prediction "
                            f"module, and {s.model.name} has none (model.mtp_modules: 0)",
                            source=source, field="workload.speculative_tokens")
    if wl.mode == "decode" and wl.context_len == 0:
        raise ScenarioError("decode needs context_len (tokens already in the KV cache)",
                            source=source, field="workload.context_len")
    if s.routing.distribution == "trace" and not s.routing.trace:
        raise ScenarioError("distribution 'trace' needs routing.trace (a file)", source=source,
                            field="routing.trace")
    if s.routing.distribution == "trace" and not Path(s.routing.trace).is_file():
        raise ScenarioError(f"{s.routing.trace}: no such trace file (a relative path is read "
                            "from the scenario's folder, then the working directory)",
                            source=source, field="routing.trace")
    r = s.routing
    if r.coactivation_strength and not 1 <= r.coactivation_groups <= m.num_experts:
        raise ScenarioError(f"{r.coactivation_groups} must be in 1..num_experts={m.num_experts} "
                            "when coactivation_strength is not 0", source=source,
                            field="routing.coactivation_groups")
    if s.routing.distribution == "hot" and not 1 <= s.routing.hot_experts < m.num_experts:
        raise ScenarioError(f"{s.routing.hot_experts} must be in 1..{m.num_experts - 1} (the "
                            "hot set is some of the model's experts, not none or all)",
                            source=source, field="routing.hot_experts")
    if s.routing.node_limit and s.routing.node_limit * 1 > 0 and m.top_k < s.routing.node_limit:
        raise ScenarioError(f"node_limit={s.routing.node_limit} must be <= top_k={m.top_k}",
                            source=source, field="routing.node_limit")
    if s.placement.policy == "file" and not s.placement.file:
        raise ScenarioError("policy 'file' needs placement.file", source=source,
                            field="placement.file")
    seen: dict[tuple, int] = {}
    for i, fault in enumerate(s.faults):
        target = ("device", fault.device) if fault.kind == "device" else (
            "link", tuple(sorted(map(str, fault.link))))
        if target in seen:
            raise ScenarioError(f"faults[{seen[target]}] already names this {fault.kind}; give "
                                "each device or link one fault", source=source,
                                field=f"faults[{i}]")
        seen[target] = i
        if fault.kind == "device" and not 0 <= fault.device < devices:
            raise ScenarioError(f"device {fault.device} is not in 0..{devices - 1}",
                                source=source, field=f"faults[{i}].device")
        if fault.kind == "link" and len(fault.link) != 2:
            raise ScenarioError("a link fault names its two ends, e.g. [n0.gpu0, leaf0]",
                                source=source, field=f"faults[{i}].link")
    assert set(DTYPES) >= {s.precision.compute}


def scenario_warnings(s: Scenario) -> list[str]:
    """One line for each thing that is valid but probably not what the user meant: a field
    another field makes unused, a compute dtype the hardware profile has no peak for.
    ``validate`` and ``run`` print them as warnings."""
    a, out = s.model.attention, []
    used = s.hardware.device.peak_dtype(s.precision.compute)
    if used != s.precision.compute:
        out.append(f"{s.hardware.name} gives no peak_flops.{s.precision.compute}: "
                   f"{s.precision.compute} GEMMs are priced at {used}'s peak")
    if s.cluster.torus_dims and s.cluster.topology != "torus":
        out.append(f"cluster.torus_dims is unused: the topology is {s.cluster.topology!r}")
    if s.workload.context_len and s.workload.mode != "decode":
        out.append(f"workload.context_len is unused in {s.workload.mode} (decode only)")
    if s.communication.cp_algorithm != "ring" and s.parallelism.cp == 1:
        out.append("communication.cp_algorithm is unused: parallelism.cp is 1 (no context "
                   "parallelism)")
    if s.memory.recompute_modules and s.memory.recompute != "selective":
        out.append(f"memory.recompute_modules is unused: memory.recompute is "
                   f"{s.memory.recompute!r}, not 'selective'")
    if s.routing.trace and s.routing.distribution != "trace":
        out.append(f"routing.trace is unused: routing.distribution is "
                   f"{s.routing.distribution!r}, not 'trace'")
    if s.placement.file and s.placement.policy != "file":
        out.append(f"placement.file is unused: placement.policy is {s.placement.policy!r}, "
                   "not 'file'")
    kind = s.hardware.device.kind
    if s.communication.alltoall.startswith("deepep") and kind != "gpu":
        out.append(f"communication.alltoall {s.communication.alltoall!r} prices NVIDIA GPU "
                   f"kernels (SMs, NVLink, RDMA) on a {kind}")
    par = s.parallelism
    if par.tp > 1 and par.ep < par.tp and par.etp == 1 and s.model.num_experts > 1:
        out.append(f"parallelism.ep={par.ep} < tp={par.tp} with etp=1: the TP ranks each hold "
                   "the same experts whole (tp / ep copies of each) and run them on their share "
                   f"of the group's tokens; engines that shard experts over TP (vLLM and SGLang "
                   f"without expert parallelism, Megatron-Core's default) are etp={par.tp}, and "
                   f"ep={par.tp} spreads the experts over the TP group instead")
    if s.workload.acceptance_rate and not s.workload.speculative_tokens:
        out.append("workload.acceptance_rate is unused: workload.speculative_tokens is 0")
    latent = [f for f in ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim") if getattr(a, f)]
    if latent and a.kind != "mla":
        out.append(f"model.attention.{latent[0]} is unused: attention kind is {a.kind!r}, not "
                   "'mla'")
    return out


def mtp_blocks(s: Scenario) -> int:
    """Multi-token-prediction modules the last stage trains (DeepSeek-V3: 1), at the step's
    tokens; serving runs them only as a speculative draft model (:func:`draft_passes`)."""
    return s.model.mtp_modules if s.workload.mode == "training" else 0


def mtp_held(s: Scenario) -> int:
    """MTP modules the last stage holds in memory: trained, or drafting in decode."""
    return mtp_blocks(s) or (s.model.mtp_modules if draft_passes(s) else 0)


def draft_passes(s: Scenario) -> int:
    """Sequential passes of the MTP module per decode step, one token per sequence each."""
    return s.workload.speculative_tokens if s.workload.mode == "decode" else 0


def without_drafts(s: Scenario) -> Scenario:
    """``s`` with no speculative drafts: the MTP module's own draft passes (one token per
    sequence) are priced as this step's blocks."""
    return replace(s, workload=replace(s.workload, speculative_tokens=0))


def tokens_per_sequence(s: Scenario) -> int:
    """Tokens of each sequence one step runs through the main model: the sequence (training,
    prefill), its next token and the drafts to verify (decode)."""
    return 1 + draft_passes(s) if s.workload.mode == "decode" else s.workload.seq_len


def output_tokens_per_sequence(s: Scenario) -> float:
    """Tokens per sequence a step yields: the sequence's own (training, prefill), and in decode
    the expected accepted run of drafts plus the verified token, (1 - a^(k+1)) / (1 - a) for k
    drafts accepted with probability a each.

    >>> from types import SimpleNamespace as N
    >>> output_tokens_per_sequence(N(workload=N(mode="decode", speculative_tokens=2,
    ...                                         acceptance_rate=0.5, seq_len=1)))
    1.75
    """
    wl = s.workload
    if wl.mode != "decode":
        return float(wl.seq_len)
    a, k = wl.acceptance_rate, draft_passes(s)
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def pipeline_end_layers(s: Scenario) -> tuple[int, int]:
    """Layers' worth of work the first and the last pipeline stage count besides their blocks
    when layers are split (Megatron's --account-for-embedding/loss-in-pipeline-split): the
    embedding, and the loss with each MTP module; 0 where the scenario does not ask."""
    par = s.parallelism
    return (1 if par.account_for_embedding else 0,
            1 + mtp_blocks(s) if par.account_for_loss else 0)


def micro_batches(s: Scenario) -> int:
    """Micro-batches each pipeline runs per step."""
    wl, par = s.workload, s.parallelism
    return wl.global_batch // par.dp // wl.micro_batch


def interleaving_problem(pp: int, vp: int) -> str | None:
    """The rule that stops ``vp`` virtual chunks per device, or None: interleaving needs
    pipeline stages to interleave."""
    return "interleaves pipeline stages; with pp=1 there are none" if vp > 1 and pp == 1 \
        else None


def dualpipe_problem(pp: int, vp: int, zero_stage: int, micro_batches: int) -> str | None:
    """The rule that stops a training layout from running DualPipe, or None: deepseek-ai/
    DualPipe needs an even number of stages and an even number of micro-batches, at least twice
    the stages; moesim needs vp 1 (the schedule holds two chunks per device itself) and no
    ZeRO-3 (its per-block gathers are priced for 1F1B only)."""
    if pp < 2 or pp % 2:
        return "dualpipe needs an even pp >= 2"
    if vp != 1:
        return "dualpipe holds two chunks per device itself: vp must be 1"
    if zero_stage >= 3:
        return "dualpipe with zero_stage 3 is not modelled: use zero_stage <= 2"
    if micro_batches % 2 or micro_batches < 2 * pp:
        return "dualpipe needs an even number of micro-batches per step, at least 2 * pp"
    return None


def _check_dualpipe(s: Scenario, source: str | None) -> None:
    """:func:`dualpipe_problem` of the scenario's layout, and training only."""
    par, wl = s.parallelism, s.workload
    field = "parallelism.schedule"
    if wl.mode != "training":
        raise ScenarioError("schedule 'dualpipe' is a training schedule (inference runs "
                            "forward chunks only); use 1f1b", source=source, field=field)
    mbs = micro_batches(s)
    problem = dualpipe_problem(par.pp, par.vp, par.zero_stage, mbs)
    if problem is not None:
        raise ScenarioError(f"{problem} (pp={par.pp}, vp={par.vp}, zero_stage="
                            f"{par.zero_stage}, micro-batches per step {mbs})", source=source,
                            field=field)
