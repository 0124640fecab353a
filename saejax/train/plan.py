"""The capacity planner (`saejax plan`): what a run needs per device, whether it fits, how fast
it steps and how much data it eats, for devices this machine need not have.

    p = plan(cfg, devices=64, device_kind="h100", mesh=(1, 64))
    print(format_plan(p))              # one screen; plan_json(p) for --json

Memory. The run's real step (`StepContract`, as `saejax train` builds it) is compiled for the
target mesh and its `memory_analysis()` read: per device, arguments (the state and the batch) +
outputs not aliased to them + temporaries (gradients among them). XLA compiles only for devices
it has: `jax.experimental.topologies` gives compile-only devices for TPUs alone (libtpu; CPU and
CUDA raise NotImplementedError in jax 0.10.2), and a step lowered on an `AbstractMesh` (with
`lowering_platforms`) still needs a device assignment to compile. So the step is compiled by
XLA:CPU in a child process given as many fake CPU devices as the plan has devices
(`--xla_force_host_platform_device_count`): the same SPMD partitioning, per-device shapes and
collectives as on the accelerators, but XLA:CPU's buffer assignment and fusion (a GPU's
temporaries can differ; with bfloat16 compute XLA:CPU converts the operands of its bfloat16
dots to float32, which GPUs do not). Compiling needs no memory for the arrays: a 16M-feature,
d=4096 step for 64 devices compiles in 1-4 s in 0.4 GB. Where compiling fails or is not asked
for (`compile="none"`), the analytic model of `saejax.train.memory` is used (0.91-1.16x the
compiled ReLU steps measured in tests/test_plan.py). Either way the phases that run outside the
step (resampling, held-out evaluation) come from that model, and the output says which was
used. `data.source=lm` adds its on-device shuffle buffer; the LM's own weights and forward are
not counted.

Time. Per device, from rates measured on an H200 (`DEVICE_KINDS`, with their sources): the
matmul FLOPs of the step (`PRODUCTS`: [B,d]x[d,F]-sized products per family, checked against
XLA's cost analysis) at the device's matmul rate x the step efficiency measured for saejax's
own step; the top-k selection of the TopK families at the measured top-k rate; the sparse TopK
path's gathers, scatters and Adam at their measured rates (an upper bound for the gathers: each
feature shard handles all B·k codes of its rows, those of other shards as zeros); and the
compiled step's collectives (read from its HLO) at the interconnect's bandwidth, NVLink within a
node, the network between nodes, nothing overlapped. TopK families assume AuxK is active (some
latent dead: the usual state of a large dictionary), which adds its products, top-k and gathers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import numpy as np

from saejax import config as config_lib
from saejax.config import Config
from saejax.errors import ConfigError
from saejax.sae import get_family
from saejax.sae.config import k_aux as aux_k
from saejax.sae.topk import SPARSE_BELOW
from saejax.train.memory import PERSISTENT, device_bytes

GiB = 2**30


# ---------------------------------------------------------------- device kinds


@dataclass(frozen=True)
class DeviceKind:
    """What the planner assumes of one accelerator; every figure names its source."""

    name: str
    memory_gib: float
    """Memory of one device (GiB), before JAX's preallocation fraction."""
    matmul_tflops: dict
    """{compute dtype: TFLOP/s of a large matmul}; float32 is JAX's default precision (TF32 on
    NVIDIA GPUs)."""
    step_efficiency: float
    """saejax's dense step time = matmul FLOPs / (matmul rate x this): its [B,F] elementwise
    passes, Adam and launch gaps, measured."""
    topk_per_s: dict
    """{compute dtype: elements of a [B,F] array reduced to its top k per second}."""
    gather_per_s: float
    """Elements of [B,k,d] decoder rows gathered per second (sparse TopK)."""
    scatter_per_s: float
    """Elements of [B,k,d] gradient rows scatter-added per second (sparse TopK)."""
    adam_per_s: float
    """Parameters updated by Adam per second."""
    hbm_tb_s: float
    per_node: int
    """Devices per node (one host process each node)."""
    nvlink_gb_s: float
    """Collective bandwidth within a node, GB/s per device, one direction."""
    network_gb_s: float
    """Collective bandwidth between nodes, GB/s per device, one direction."""
    platform: str
    source: str


def _h200() -> DeviceKind:
    # /work/shared/DESIGN.md, "Measured on a GPU (one H200, jax 0.11.2, B=4096, d_in=2048,
    # F=131072)": 8192^3 matmul 775 (bf16) / 404 (float32, TF32) TFLOP/s; the saejax ReLU step
    # (float32) 0.050 s = 5 products of 2·B·d·F (1.1e13 FLOPs) at 220 TFLOP/s = 0.544 x 404;
    # two-stage top-k of [4096, 131072] 25 ms (float32) / 12.8 ms (bf16); gather decode of
    # [B,k,d] (k=32) 0.9 ms; scatter-add of the W_dec gradient 1.1 ms; Adam over all
    # 5.37e8 parameters 2.5 ms.
    bf = 4096 * 131072
    bkd = 4096 * 32 * 2048
    params = 2 * 2048 * 131072 + 131072 + 2048
    return DeviceKind(
        name="H200", memory_gib=139.0,
        matmul_tflops={"float32": 404.0, "bfloat16": 775.0},
        step_efficiency=round(10 * 4096 * 2048 * 131072 / 0.050 / 404e12, 3),
        topk_per_s={"float32": bf / 0.025, "bfloat16": bf / 0.0128},
        gather_per_s=bkd / 0.9e-3, scatter_per_s=bkd / 1.1e-3, adam_per_s=params / 2.5e-3,
        hbm_tb_s=4.8, per_node=8, nvlink_gb_s=450.0, network_gb_s=50.0, platform="gpu",
        source="rates measured on one H200 (DESIGN.md, 'Measured on a GPU'); memory: the "
               "project's H200 machine (about 139 GiB); HBM 4.8 TB/s, NVLink 4 900 GB/s "
               "both directions and one 400 Gb/s InfiniBand NIC per GPU (8 per node, DGX/HGX "
               "H200): NVIDIA's specifications, nominal")


def _h100() -> DeviceKind:
    # Not measured: the H100 SXM has the H200's GH100 compute (NVIDIA lists 989 dense bf16
    # TFLOP/s for both), so matmul rates and step efficiency are the H200's; the memory-bound
    # rates (top-k, gathers, scatters, Adam) scale with HBM bandwidth, 3.35 against 4.8 TB/s.
    h = _h200()
    m = 3.35 / h.hbm_tb_s
    return dataclasses.replace(
        h, name="H100", memory_gib=81559 / 1024,
        topk_per_s={k: v * m for k, v in h.topk_per_s.items()},
        gather_per_s=h.gather_per_s * m, scatter_per_s=h.scatter_per_s * m,
        adam_per_s=h.adam_per_s * m, hbm_tb_s=3.35,
        source="H100 SXM 80GB, not measured: the H200's measured matmul rates (same GH100 "
               "compute), its memory-bound rates x 3.35/4.8 (HBM TB/s, NVIDIA); 81,559 MiB "
               "(nvidia-smi); NVLink 4 and 400 Gb/s InfiniBand per GPU as for the H200")


DEVICE_KINDS = {"h200": _h200(), "h100": _h100()}
"""Device kinds `plan` knows (`device_kind=`), by lower-case name."""

JAX_MEMORY_FRACTION = 0.75
"""JAX preallocates this fraction of a GPU's memory and allocates only within it, unless
XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise."""


# ---------------------------------------------------------------- FLOPs


PRODUCTS = {"relu": 5, "jumprelu": 5, "gated": 7, "topk": 5, "batchtopk": 5, "matryoshka": 5}
"""[B,d]x[d,F]-sized products (2·B·d·F FLOPs each) of a dense step. Forward: encoder, decoder;
backward: the W_enc and W_dec gradients and the codes' gradient (the inputs' is never formed).
Gated adds its frozen-decoder reconstruction (forward and the gate's gradient). XLA's cost
analysis of the compiled steps counts 5.09 (relu), 5.11 (jumprelu), 7.14 (gated) products at
d=256, F=2048, B=512 (the rest is elementwise work). A family not listed is counted as 6."""

AUXK_PRODUCTS = 3
"""Products AuxK adds to a dense TopK-family step when a latent is dead: the decoder on the
top k_aux dead latents, its W_dec gradient and its codes' gradient (cost analysis: topk dense
8.08, batchtopk 8.53, matryoshka 8.60 at the shape above)."""


def selects_top_k(arch: str) -> bool:
    """Whether the family selects codes by top-k (and has AuxK): topk and the families that
    read its section."""
    return arch == "topk" or "topk" in get_family(arch).sections


def for_target(cfg: Config, kind: DeviceKind) -> Config:
    """cfg as it trains on `kind`: `sae.topk.path=auto` resolved with the target platform's
    threshold (`saejax.sae.topk.SPARSE_BELOW`), not the compiling machine's."""
    s = cfg.sae
    if s.arch != "topk" or s.topk.path != "auto":
        return cfg
    sparse = s.topk.k <= SPARSE_BELOW[kind.platform] * s.n_features
    topk = dataclasses.replace(s.topk, path="sparse" if sparse else "dense")
    return dataclasses.replace(cfg, sae=dataclasses.replace(s, topk=topk))


def is_sparse(cfg: Config) -> bool:
    return cfg.sae.arch == "topk" and cfg.sae.topk.path == "sparse"


def step_flops(cfg: Config, n_data: int, n_model: int, aux_active: bool = True) -> float:
    """Matmul FLOPs of one step per device. Dense: products x 2·(B/data)·d·(F/model). Sparse
    TopK: the encoder's product, plus 2·B·k·d for each of the decode, the codes' gradient and the
    W_dec and W_enc gradient scatters (each device handles all of its rows' k codes), for k and,
    with AuxK active, k_aux."""
    s = cfg.sae
    b, d, f = cfg.train.batch_size / n_data, s.d_in, s.n_features / n_model
    aux = aux_active and selects_top_k(s.arch)
    if is_sparse(cfg):
        k = s.topk.k + (aux_k(s) if aux else 0)
        return 2 * b * d * f + 4 * 2 * b * k * d
    return (PRODUCTS.get(s.arch, 6) + (AUXK_PRODUCTS if aux else 0)) * 2 * b * d * f


# ---------------------------------------------------------------- compiling the step


def compiled_step(cfg: Config, devices: list) -> dict:
    """Compile the run's step for a mesh over `devices` (cfg.mesh's shape) exactly as
    `saejax.train.loop.train` does, and read what the planner needs from it: memory analysis,
    per-device bytes of parameters and Adam moments, the whole state's bytes, cost-analysis
    FLOPs and the collectives of the compiled HLO."""
    import jax

    from saejax.sharding import make_mesh
    from saejax.train.runner import compile_step
    from saejax.train.step import StepContract

    mesh = make_mesh(cfg.mesh, devices)
    contract = StepContract.build(cfg, mesh)
    state = contract.abstract_state()
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.sae.d_in), np.float32,
                                 sharding=contract.batch_sharding)
    compiled, memory = compile_step(contract.step_fn, state, batch)
    if memory is None:
        raise RuntimeError("the backend gives no memory analysis")

    def local(tree) -> int:  # bytes one device holds
        return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                       for x in jax.tree.leaves(tree)))

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
        "alias": memory.alias_size_in_bytes, "temp": memory.temp_size_in_bytes,
        "parameters": local(state.params), "adam": local(state.opt_state),
        "state_bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))),
        "flops": float(cost.get("flops", 0.0)),
        "collectives": collectives(compiled.as_text()),
        "backend": f"{jax.default_backend()}, {len(devices)} devices",
    }


def compile_in_child(cfg: Config, n_devices: int, timeout: float = 600) -> dict:
    """`compiled_step` in a child process with `n_devices` fake CPU devices (this process's
    devices, whatever they are, stay untouched)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n_devices}".strip()}
    request = json.dumps({"config": config_lib.to_dict(cfg)})
    done = subprocess.run([sys.executable, "-m", "saejax.train.plan"], input=request, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"compiling in a child process failed: {lines[-1]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["backend"] = f"XLA:CPU, {n_devices} fake devices in a child process"
    return out


def _child() -> None:
    """The child of `compile_in_child`: a config on stdin, `compiled_step`'s dict on stdout."""
    import jax

    request = json.loads(sys.stdin.read())
    cfg = config_lib.from_dict(Config, request["config"])
    print(json.dumps(compiled_step(cfg, jax.devices())))


# ---------------------------------------------------------------- collectives in HLO


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _iota(dims: list[int], perm: list[int] | None) -> np.ndarray:
    a = np.arange(int(np.prod(dims))).reshape(dims)
    return a.transpose(perm) if perm else a


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def replica_groups(line: str, n_devices: int | None = None) -> list[list[int]]:
    """The device groups of one HLO collective, in any of XLA's three spellings:
    {{0,1},{2,3}}, iota [G,S]<=[dims]T(perm), and mesh['a'=2,'b'=4] (device_ids=...) {'b'}.
    No groups = one group of all devices (n_devices)."""
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        perm = _ints(m[3]) if m[3] else None
        return _iota(_ints(m[2]), perm).reshape(_ints(m[1])).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\]"
                  r"(?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}", line)
    if m:
        axes = re.findall(r"'([^']+)'=(\d+)", m[1])
        names, dims = [a for a, _ in axes], [int(n) for _, n in axes]
        ids = (_iota(_ints(m[2]), _ints(m[3]) if m[3] else None) if m[2]
               else np.arange(int(np.prod(dims)))).reshape(dims)
        grouped = [names.index(a) for a in re.findall(r"'([^']+)'", m[4])]
        rest = [i for i in range(len(dims)) if i not in grouped]
        size = int(np.prod([dims[i] for i in grouped]))
        return ids.transpose(rest + grouped).reshape(-1, size).tolist()
    m = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)+)\}", line)
    if m:
        return [_ints(g) for g in re.findall(r"\{([\d,\s]*)\}", m[1])]
    return [list(range(n_devices))] if n_devices else []


def collectives(hlo: str) -> list[dict]:
    """Every collective of a compiled (SPMD-partitioned) HLO module: op, bytes of its result per
    device, and its device groups. A collective inside a loop body is listed once."""
    out = []
    n_devices = None
    m = re.search(r"num_partitions=(\d+)", hlo)
    if m:
        n_devices = int(m[1])
    for line in hlo.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        shapes = [(t, _ints(dims)) for t, dims in _SHAPE.findall(m[1])]
        if "-start(" in line and m[2] != "all-reduce":
            shapes = shapes[len(shapes) // 2:]  # (operands, results): the results
        size = sum(_BYTES.get(t, 4) * int(np.prod(dims)) for t, dims in shapes)
        out.append({"op": m[2], "bytes": size, "groups": replica_groups(line, n_devices)})
    return out


def wire_bytes(op: str, size: int, n: int) -> float:
    """Bytes each device sends for one collective on a group of n (ring algorithms), `size`
    being the bytes of its result per device."""
    if n <= 1:
        return 0.0
    return {"all-reduce": 2 * (n - 1) / n * size, "all-gather": (n - 1) / n * size,
            "reduce-scatter": (n - 1) * size, "all-to-all": (n - 1) / n * size,
            "collective-permute": size}[op]


def crosses_nodes(groups: list[list[int]], per_node: int) -> bool:
    """Whether a group spans devices of more than one node (devices numbered node by node)."""
    return any(len({i // per_node for i in g}) > 1 for g in groups)


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    """A run's needs per device on a device kind and mesh (bytes, seconds, per second)."""

    arch: str
    d_in: int
    n_features: int
    batch_size: int
    compute_dtype: str
    topk_path: str | None
    device_kind: str
    devices: int
    mesh: tuple[int, int]
    memory_source: str
    memory: dict[str, int]
    """Bytes per device, part by part (see `format_plan`)."""
    peak_bytes: int
    usable_bytes: int
    memory_fraction: float
    fits: bool
    advice: str
    flops: float
    """Matmul FLOPs of one step per device (`step_flops`)."""
    compiled_flops: float | None
    """XLA's cost-analysis FLOPs of the compiled per-device step (loops counted once)."""
    time: dict[str, float]
    """Seconds per step, term by term."""
    step_s: float
    tokens_per_s: float
    collectives: list[dict]
    """op, count, bytes per device sent, over the network or not, seconds (summed by kind)."""
    rows_per_s: float
    bytes_per_s: dict[str, float]
    """{dtype: bytes/s of activations the LM or store delivers}."""
    host_read_fraction: float
    """The fraction of all rows each host reads (1 when the batch is not split over hosts)."""
    lm_params: float
    lm_flops_per_s: float
    lm_devices: float
    """Devices of this kind whose whole bfloat16 matmul rate the LM forward needs."""
    checkpoint_bytes: int
    checkpoint_writers: int
    checkpoint_s: float
    storage_gb_s: float
    assumptions: list[str] = field(default_factory=list)


def plan(cfg: Config, *, devices: int, device_kind: str = "h100",
         device_memory_gib: float | None = None, mesh: tuple[int, int] | None = None,
         compile: str = "child", memory_fraction: float = JAX_MEMORY_FRACTION,
         storage_gb_s: float = 2.0, lm_params: float = 0.0, aux_active: bool = True) -> Plan:
    """Plan `cfg` on `devices` devices of `device_kind` (`DEVICE_KINDS`) with `mesh` = (data,
    model) (default: cfg.mesh). compile: "child" (fake CPU devices in a child process), "here"
    (this process's first `devices` devices), "none" (the analytic model). memory_fraction: of
    each device's memory JAX may use. storage_gb_s: checkpoint write bandwidth per host (GB/s,
    assumed). lm_params: the LM's parameter count, for the compute its forward needs."""
    try:
        kind = DEVICE_KINDS[device_kind.lower()]
    except KeyError:
        raise ConfigError(f"device kind {device_kind!r} is not one of "
                          f"{', '.join(DEVICE_KINDS)}") from None
    if device_memory_gib:
        kind = dataclasses.replace(kind, memory_gib=device_memory_gib)
    if mesh is not None:
        cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=mesh[0],
                                                                model=mesh[1]))
    config_lib.validate(cfg, devices)
    n_data, n_model = config_lib.resolve_mesh_shape(cfg.mesh, devices)
    cfg = dataclasses.replace(for_target(cfg, kind),
                              mesh=dataclasses.replace(cfg.mesh, data=n_data, model=n_model))

    compiled, source = None, "analytic model (saejax.train.memory)"
    if compile != "none":
        try:
            if compile == "here":
                import jax
                compiled = compiled_step(cfg, jax.devices()[:devices])
            else:
                compiled = compile_in_child(cfg, devices)
            source = f"compiled step ({compiled['backend']})"
        except Exception as e:  # the model still answers; the output says why
            source += f"; compiling failed: {str(e)[:200]}"
    memory = memory_parts(cfg, n_data, n_model, compiled)
    peak = peak_bytes(memory)
    usable = int(kind.memory_gib * GiB * memory_fraction)
    fits = peak <= usable

    groups = [] if compiled is None else compiled["collectives"]
    comm = collective_times(groups, kind)
    time = step_terms(cfg, kind, n_data, n_model, aux_active)
    time.update({f"{c['op']}s": c["seconds"] for c in comm})
    step_s = sum(time.values())
    b, d = cfg.train.batch_size, cfg.sae.d_in
    rows = b / step_s
    ckpt = compiled["state_bytes"] if compiled else checkpoint_bytes(cfg)
    writers = checkpoint_writers(kind, devices, n_model)
    s = cfg.sae
    return Plan(
        arch=s.arch, d_in=d, n_features=s.n_features, batch_size=b,
        compute_dtype=s.compute_dtype, topk_path=s.topk.path if s.arch == "topk" else None,
        device_kind=kind.name, devices=devices, mesh=(n_data, n_model), memory_source=source,
        memory=memory, peak_bytes=peak, usable_bytes=usable, memory_fraction=memory_fraction,
        fits=fits, advice="" if fits else advice(cfg, memory, usable, n_data, n_model),
        flops=step_flops(cfg, n_data, n_model, aux_active),
        compiled_flops=compiled["flops"] if compiled else None,
        time=time, step_s=step_s, tokens_per_s=rows, collectives=comm, rows_per_s=rows,
        bytes_per_s={"float32": rows * d * 4, "bfloat16": rows * d * 2},
        host_read_fraction=host_read_fraction(kind, devices, n_data, n_model),
        lm_params=lm_params, lm_flops_per_s=2 * lm_params * rows,
        lm_devices=2 * lm_params * rows / (kind.matmul_tflops["bfloat16"] * 1e12),
        checkpoint_bytes=ckpt, checkpoint_writers=writers,
        checkpoint_s=ckpt / writers / (storage_gb_s * 1e9), storage_gb_s=storage_gb_s,
        assumptions=assumptions(cfg, kind, aux_active),
    )


def host_read_fraction(kind: DeviceKind, devices: int, n_data: int, n_model: int) -> float:
    """The share of each batch one host reads: the rows of the positions along mesh.data its
    devices hold (`saejax.sharding.process_rows`; devices numbered node by node, mesh.model the
    inner axis). With mesh.data = 1 every host reads every row."""
    if devices <= kind.per_node:
        return 1.0
    return min(1.0, max(1, kind.per_node // n_model) / n_data)


def checkpoint_writers(kind: DeviceKind, devices: int, n_model: int) -> int:
    """Hosts that write a checkpoint: those holding the first replica (mesh.data position 0) of
    the state's shards, which Orbax writes once each (on GPUs it writes no replica in parallel
    when JAX_PLATFORMS names them: `use_replica_parallel` is off there)."""
    hosts = max(1, math.ceil(devices / kind.per_node))
    return max(1, min(hosts, n_model // kind.per_node))


STEP_TEMPORARIES = "step temporaries"


def memory_parts(cfg: Config, n_data: int, n_model: int, compiled: dict | None) -> dict:
    """Bytes per device, part by part: the state (parameters, Adam moments, the rest with the
    batch), the gradients and other temporaries of the step, the phases outside the step and the
    activation buffer, from the compiled step where there is one, else `memory.device_bytes`."""
    from saejax.train.loop import EVAL_ROWS
    from saejax.train.resample import CHUNK

    model = device_bytes(cfg, n_data, n_model, eval_rows=EVAL_ROWS, chunk_rows=CHUNK)
    state = model.pop(PERSISTENT[0])  # parameters, gradients and two Adam moments: 4 equal parts
    outside = {k: v for k, v in model.items() if k in ("resampling", "evaluation")}
    buffer = {k: v for k, v in model.items() if k == PERSISTENT[1]}
    if compiled is None:
        return {"parameters": state // 4, "Adam moments": state // 2,
                "gradients": state // 4, STEP_TEMPORARIES: model["step activations"],
                **outside, **buffer}
    c = compiled
    return {"parameters": c["parameters"], "Adam moments": c["adam"],
            "other state and batch": c["argument"] - c["parameters"] - c["adam"],
            "gradients": c["parameters"],  # within the compiled temporaries
            STEP_TEMPORARIES: c["temp"] - c["parameters"] + c["output"] - c["alias"],
            **outside, **buffer}


def peak_bytes(memory: dict) -> int:
    """The step's total (state, gradients, temporaries) or, if larger, the state with the
    largest phase outside the step; plus the activation buffer, held throughout."""
    state = sum(v for k, v in memory.items()
                if k in ("parameters", "Adam moments", "other state and batch"))
    step = state + memory["gradients"] + memory[STEP_TEMPORARIES]
    outside = max([memory.get(k, 0) for k in ("resampling", "evaluation")])
    return max(step, state + outside) + memory.get(PERSISTENT[1], 0)


def checkpoint_bytes(cfg: Config) -> int:
    """Bytes of a checkpoint without compiling: parameters and two Adam moments (3/4 of the
    state term of `device_bytes` on one device), plus the per-feature records."""
    one = device_bytes(cfg, 1, 1, eval_rows=0, chunk_rows=1)[PERSISTENT[0]]
    return 3 * one // 4 + 8 * cfg.sae.n_features


def step_terms(cfg: Config, kind: DeviceKind, n_data: int, n_model: int,
               aux_active: bool) -> dict[str, float]:
    """Seconds per step of the compute terms of the module docstring."""
    s = cfg.sae
    b, d, f = cfg.train.batch_size / n_data, s.d_in, s.n_features / n_model
    rate = kind.matmul_tflops[s.compute_dtype] * 1e12 * kind.step_efficiency
    aux = aux_active and selects_top_k(s.arch)
    if is_sparse(cfg):
        # One product, the encoder's; the gathers, scatters and Adam at their own measured
        # rates (the dense step's efficiency covers its Adam and elementwise work).
        rows = b * (s.topk.k + (aux_k(s) if aux else 0)) * d
        terms = {"matmuls": 2 * b * d * f / rate,
                 "gathers and scatters": 2 * rows / kind.gather_per_s
                 + 2 * rows / kind.scatter_per_s,
                 "Adam": (2 * d * f + f + d) / kind.adam_per_s}
    else:
        terms = {"matmuls": step_flops(cfg, n_data, n_model, aux_active) / rate}
    if selects_top_k(s.arch):
        terms["top-k"] = (1 + aux) * b * f / kind.topk_per_s[s.compute_dtype]
    return terms


def collective_times(found: list[dict], kind: DeviceKind) -> list[dict]:
    """The compiled step's collectives summed by op and by link (network or NVLink), each with
    the bytes one device sends and the seconds that takes."""
    out: dict[tuple[str, bool], dict] = {}
    for c in found:
        n = len(c["groups"][0]) if c["groups"] else 1
        sent = wire_bytes(c["op"], c["bytes"], n)
        if not sent:
            continue
        net = crosses_nodes(c["groups"], kind.per_node)
        row = out.setdefault((c["op"], net), {"op": c["op"], "network": net, "count": 0,
                                              "bytes": 0.0, "seconds": 0.0})
        row["count"] += 1
        row["bytes"] += sent
        row["seconds"] += sent / ((kind.network_gb_s if net else kind.nvlink_gb_s) * 1e9)
    return list(out.values())


def advice(cfg: Config, memory: dict, usable: int, n_data: int, n_model: int) -> str:
    """What to change when the plan does not fit: the dictionary's share (mesh.model, which
    also needs more devices unless mesh.data shrinks) when the state, or the state with the
    phases outside the step (whose size the batch does not set), is too big; else the batch
    (the step's temporaries grow with B / mesh.data)."""
    s, b = cfg.sae, cfg.train.batch_size
    per_model = memory["parameters"] + memory["Adam moments"] + memory["gradients"]
    outside = max(memory.get(k, 0) for k in ("resampling", "evaluation"))
    fixed = sum(memory.values()) - per_model - memory[STEP_TEMPORARIES]
    fixed -= sum(memory.get(k, 0) for k in ("resampling", "evaluation"))
    # A state taking more than 80% of the memory leaves too little for any batch.
    if per_model + fixed > usable * 0.8 or per_model - memory["gradients"] + outside > usable:
        need = n_model * max(per_model / max(usable * 0.8 - fixed, 1),
                             (per_model - memory["gradients"] + outside) / max(usable - fixed, 1))
        m = n_model
        while m < need or s.n_features % m:
            m *= 2
        return (f"the parameters, gradients and Adam moments need {per_model / GiB:.1f} GiB "
                f"per device, resampling or evaluation {outside / GiB:.1f} GiB more instead of "
                f"the step's temporaries: shard the dictionary wider, "
                f"mesh.model={m} (with mesh.data={max(1, n_data * n_model // m)} on as many "
                f"devices, or more devices), or fewer sae.n_features")
    room = usable - fixed - per_model
    smaller = int(b * room / max(memory[STEP_TEMPORARIES], 1)) // n_data * n_data
    return (f"the step's temporaries need {memory[STEP_TEMPORARIES] / GiB:.1f} GiB per device: "
            f"lower train.batch_size to about {max(smaller, n_data)} (they grow with "
            f"batch_size / mesh.data), or raise mesh.data with more devices")


def assumptions(cfg: Config, kind: DeviceKind, aux_active: bool) -> list[str]:
    out = [kind.source,
           f"step efficiency {kind.step_efficiency} of the matmul rate: saejax's ReLU step "
           "measured on the H200 (float32); bfloat16 assumed the same",
           "collectives not overlapped with compute; ring algorithms; a collective inside a "
           "loop counted once"]
    if aux_active and selects_top_k(cfg.sae.arch):
        out.append(f"AuxK active (some latent dead): k_aux={aux_k(cfg.sae)} adds its top-k, "
                   "products or gathers")
    return out


# ---------------------------------------------------------------- output


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def _si(n: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}"


def format_plan(p: Plan) -> str:
    """The plan on one screen."""
    path = f" ({p.topk_path})" if p.topk_path else ""
    compiled = "compiled" in p.memory_source
    lines = [f"saejax plan: {p.arch}{path}, d_in {p.d_in}, {p.n_features:,} features, batch "
             f"{p.batch_size:,}, {p.compute_dtype}",
             f"  on {p.devices} x {p.device_kind}, mesh.data {p.mesh[0]} x mesh.model {p.mesh[1]}",
             f"memory per device, from the {p.memory_source}:"]
    notes = {"gradients": "within the temporaries" if compiled else "",
             "resampling": "analytic; instead of the step's temporaries",
             "evaluation": "analytic; instead of the step's temporaries"}
    for k, v in p.memory.items():
        lines.append(f"  {k:<24}{_gib(v):>12}  {notes.get(k, '')}".rstrip())
    room = p.usable_bytes - p.peak_bytes
    lines.append(f"  {'peak':<24}{_gib(p.peak_bytes):>12}  of {_gib(p.usable_bytes)} usable "
                 f"({p.memory_fraction:.0%} of the memory)")
    lines.append(f"  {'FITS' if p.fits else 'DOES NOT FIT'}: headroom {_gib(room)} "
                 f"({room / p.usable_bytes:.0%} of the usable memory)")
    if p.advice:
        lines += textwrap.wrap(p.advice, 100, initial_indent="  to fit: ",
                               subsequent_indent="    ")
    counted = (f"; XLA's count, loop bodies once: {p.compiled_flops:.3g}"
               if p.compiled_flops else "")
    lines.append(f"step time per device ({p.flops:.3g} matmul FLOPs{counted}):")
    for k, v in p.time.items():
        lines.append(f"  {k:<24}{v * 1e3:>9.3g} ms")
    for c in p.collectives:
        lines.append(f"    {c['count']} {c['op']}: {_si(c['bytes'], 'B')} sent per device over "
                     f"{'the network' if c['network'] else 'NVLink'}")
    lines.append(f"  {'step':<24}{p.step_s * 1e3:>9.3g} ms = {p.tokens_per_s:,.0f} tokens/s, "
                 f"{1e9 / p.tokens_per_s / 3600:.3g} h per billion tokens")
    share = ("all of them" if p.host_read_fraction >= 1 else
             f"{p.host_read_fraction:.3g} of them")
    lines.append(f"activations: {p.rows_per_s:,.0f} rows/s = "
                 f"{_si(p.bytes_per_s['float32'], 'B/s')} float32, "
                 f"{_si(p.bytes_per_s['bfloat16'], 'B/s')} bfloat16; each host reads {share}")
    lines.append(f"  a store of a billion rows: {_si(p.d_in * 2e9, 'B')} in bfloat16")
    if p.lm_params:
        lines.append(f"  LM forward of {p.lm_params:.3g} parameters: "
                     f"{_si(p.lm_flops_per_s, 'FLOP/s')} = {p.lm_devices:.3g} {p.device_kind} "
                     f"at the bf16 matmul rate")
    lines.append(f"checkpoint: {_si(p.checkpoint_bytes, 'B')}, written by "
                 f"{p.checkpoint_writers} host(s) in {p.checkpoint_s:,.0f} s at "
                 f"{p.storage_gb_s:g} GB/s each (assumed)")
    for a in p.assumptions:
        lines += textwrap.wrap(a, 100, initial_indent="assumed: ", subsequent_indent="  ")
    return "\n".join(lines)


def plan_json(p: Plan) -> str:
    return json.dumps(dataclasses.asdict(p), indent=1)


if __name__ == "__main__":
    _child()
