"""HBM traffic of a compiled XLA program, read from its optimised HLO text.

Every top-level instruction of the entry computation that runs as a kernel (a
fusion, a library call such as a cuDNN convolution, a copy, a collective) reads its
operands from device memory and writes its result there. Summing operand and result
bytes over those instructions gives the program's memory traffic per call, as XLA's
own cost model counts it, before caches. Memory-bound programs (ResNet training on
an H100 is one: BatchNorm, ReLU and residual passes dominate) run no faster than
``traffic / memory bandwidth``; a change that cuts traffic should cut step time.

A ``while`` loop (``jax.lax.scan``, e.g. several train steps per dispatch) counts the
kernels of its body and condition once per iteration, from the trip count XLA
annotates; a fusion operand that the fused computation only slices (a scan reading
its step's batch) counts the bytes of the slices.

A scatter updates its operand in place (XLA gives the result the operand's buffer, or copies
the operand first in a kernel of its own, which counts). A fused scatter whose positions the
program fixes (indices built inside the fusion from iotas, as a strided ``.at[::s].add``
builds them) reads and writes only the elements it updates, plus its updates; one whose
indices are data (a max pool's gradient) counts its operand whole, since its updates land
in nearly every sector of it.

Approximations: an operand otherwise counts whole, even where a fusion reads only part
of it, and L2 hits are ignored, so this is an upper estimate of DRAM traffic. An
asynchronous operation counts once, at its ``-start``; collectives count the local
buffer's bytes, not the network's.
"""

from __future__ import annotations

import collections
import dataclasses
import re

ELEMENT_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(ELEMENT_BYTES) + r")\[([0-9,]*)\]")
# "%name = SHAPE opcode(operands), attributes"; SHAPE is an array or a (tuple, of, arrays).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\([^=]*?\)|\S+) ([a-z][a-z0-9\-]*)\((.*)$")
# Printer comments such as the "/*index=5*/" inside tuples of more than five elements.
_COMMENT = re.compile(r"/\*.*?\*/")
# Instructions that launch nothing: they name or regroup buffers.
FREE_OPCODES = {"call", "while", "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id", "replica-id"}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, e.g. ``bf16[256,56,56,64]{3,2,1,0}`` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * ELEMENT_BYTES[dtype]
    return total


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel-launching instruction of the entry computation.

    ``kind`` is the fusion kind (``fusion:kLoop``, ``fusion:kInput`` ...), the custom-call
    target (``__cudnn$convForward`` ...) or the opcode; ``phase`` is ``forward``,
    ``backward`` (under JAX's ``transpose(jvp(...))``) or ``other`` (optimizer, metrics);
    ``op_name`` is JAX's name of the operation it came from.
    """

    name: str
    kind: str
    phase: str
    op_name: str
    read_bytes: int
    write_bytes: int

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """Each computation's instruction lines by name, and the entry computation's name."""
    bodies: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = header.group(2)
            bodies[current] = []
            entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            bodies[current].append(_COMMENT.sub("", line))  # else a tuple of six or more elements would not match
    if not entry:
        raise ValueError("hlo_traffic: no ENTRY computation in this text; pass compiled.as_text()")
    return bodies, entry


def entry_instructions(hlo_text: str) -> list[tuple[str, str, str, str]]:
    """``(name, shape, opcode, rest of line)`` of every instruction the entry computation of
    optimised HLO text (``compiled.as_text()``) runs, printer comments removed.

    A ``call`` is replaced by the instructions of the computation it calls, then listed
    itself (it launches nothing): on a GPU, XLA groups kernels into command buffers (CUDA
    graphs) that way, ``%call = ... call(...), to_apply=%command_buffer``, and the kernels
    inside still move their bytes. A ``while`` is likewise replaced by its condition's
    instructions n + 1 times and its body's n times, n being the ``known_trip_count`` XLA
    annotates; a loop without one is an error (its traffic per call is unknown).
    """
    return _entry_instructions(*_computations(hlo_text))


def _entry_instructions(bodies: dict[str, list[str]], entry: str) -> list[tuple[str, str, str, str]]:
    """:func:`entry_instructions` of already split computations."""

    def walk(computation: str) -> list[tuple[str, str, str, str]]:
        instructions = []
        for line in bodies[computation]:
            m = _INSTRUCTION.match(line)
            if not m:
                if re.match(r"^\s*(?:ROOT )?%\S+ = ", line):  # one this parser cannot read: say so, never skip it
                    raise ValueError(f"hlo_traffic cannot parse this HLO instruction; extend _INSTRUCTION:\n{line}")
                continue
            if m.group(3) == "call":
                instructions += walk(re.search(r"to_apply=%([\w.\-]+)", line).group(1))
            elif m.group(3) == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
                if not trips:
                    raise ValueError(
                        f"hlo_traffic: while loop %{m.group(1)} has no known_trip_count, so its traffic per "
                        "call is unknown; count a program whose loops have static trip counts (jax.lax.scan)"
                    )
                n = int(trips.group(1))
                condition = walk(re.search(r"condition=%([\w.\-]+)", line).group(1))
                body = walk(re.search(r"body=%([\w.\-]+)", line).group(1))
                instructions += condition * (n + 1) + body * n
            instructions.append(m.groups())
        return instructions

    return walk(entry)


def entry_kernels(hlo_text: str) -> list[Kernel]:
    """The kernels of the entry computation of optimised HLO text (``compiled.as_text()``)."""
    bodies, entry = _computations(hlo_text)
    sizes: dict[str, int] = {}
    kernels = []
    for name, shape, opcode, rest in _entry_instructions(bodies, entry):
        sizes[name] = shape_bytes(shape)
        if opcode in FREE_OPCODES or opcode.endswith("-done"):
            continue  # "-done" waits for its "-start" (async collective or copy), which moved the bytes
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        read_sizes = [sizes.get(o, 0) for o in operands]
        write = sizes[name]
        if opcode == "fusion":
            kind = "fusion:" + re.search(r"kind=(\w+)", rest).group(1)
            fused = bodies[re.search(r"calls=%([\w.\-]+)", rest).group(1)]
            sliced = _sliced_parameter_bytes(fused)
            read_sizes = [min(size, sliced.get(i, size)) for i, size in enumerate(read_sizes)]
            in_place = _in_place_scatter(fused)
            if in_place:
                parameter, write = in_place
                read_sizes[parameter] = write
        elif opcode == "custom-call":
            kind = re.search(r'custom_call_target="([^"]+)"', rest).group(1)
        else:
            kind = opcode
        op = re.search(r'op_name="([^"]*)"', rest)
        op_name = op.group(1) if op else ""
        phase = "backward" if "transpose(jvp(" in op_name else "forward" if "jvp(" in op_name else "other"
        read = sum(read_sizes)
        kernels.append(Kernel(name, kind, phase, op_name, read, write))
    return kernels


def _updated_bytes(result_shape: str, updates_shape: str) -> int:
    """Bytes of a scatter's result that its updates touch: the updates' elements at the
    result's element size."""
    (result_dtype, _), = _ARRAY.findall(result_shape)
    (updates_dtype, _), = _ARRAY.findall(updates_shape)
    return shape_bytes(updates_shape) // ELEMENT_BYTES[updates_dtype] * ELEMENT_BYTES[result_dtype]


def _in_place_scatter(fused: list[str]) -> tuple[int, int] | None:
    """``(parameter number, bytes updated)`` where a fused computation's root is a single-operand
    scatter into one of its parameters at positions fixed by the program (indices built from
    iotas and constants inside the fusion, as a strided ``.at[::s].add`` is), which the fusion
    then updates in place."""
    parameters: dict[str, int] = {}
    shapes: dict[str, str] = {}
    reads_a_parameter: set[str] = set()
    uses: collections.Counter[str] = collections.Counter()
    scatter = None
    for line in fused:
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        shapes[name] = shape
        if opcode == "parameter":
            parameters[name] = int(rest.split(")", 1)[0])
            reads_a_parameter.add(name)
            continue
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        uses.update(operands)
        if reads_a_parameter.intersection(operands):
            reads_a_parameter.add(name)
        if opcode == "scatter" and line.lstrip().startswith("ROOT ") and len(operands) == 3:
            scatter = shape, operands
    if scatter is None:
        return None
    shape, (operand, indices, updates) = scatter
    if operand not in parameters or uses[operand] != 1:  # read elsewhere in the fusion: whole
        return None
    if indices in reads_a_parameter:
        # positions that depend on the data (a max pool's gradient to each window's maximum)
        # land all over the operand, touching nearly every 32-byte sector of it: count it whole
        return None
    return parameters[operand], _updated_bytes(shape, shapes[updates])


def _sliced_parameter_bytes(fused: list[str]) -> dict[int, int]:
    """Parameter number -> bytes read, for each parameter of a fused computation whose only
    users are ``slice`` / ``dynamic-slice`` instructions (it reads just those slices)."""
    parameters: dict[str, int] = {}
    users: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for line in fused:
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        if opcode == "parameter":
            parameters[name] = int(rest.split(")", 1)[0])
            continue
        for operand in set(re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])):
            users[operand].append((opcode, shape))
    return {
        number: sum(shape_bytes(shape) for _, shape in users[name])
        for name, number in parameters.items()
        if users[name] and all(opcode in ("slice", "dynamic-slice") for opcode, _ in users[name])
    }


def summarise(kernels: list[Kernel]) -> dict:
    """Total traffic and its split by phase and by kernel kind (bytes, kernel counts)."""
    by_kind: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    by_phase: dict[str, int] = collections.Counter()
    for k in kernels:
        by_kind[k.kind][0] += 1
        by_kind[k.kind][1] += k.bytes
        by_phase[k.phase] += k.bytes
    return {
        "traffic_bytes": sum(k.bytes for k in kernels),
        "kernels": len(kernels),
        "by_phase": dict(by_phase),
        "by_kind": {kind: {"kernels": n, "bytes": b} for kind, (n, b) in sorted(by_kind.items(), key=lambda kv: -kv[1][1])},
    }
