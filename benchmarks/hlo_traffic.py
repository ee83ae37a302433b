"""HBM traffic of a compiled XLA program, read from its optimised HLO text.

Every top-level instruction of the entry computation that runs as a kernel (a
fusion, a library call such as a cuDNN convolution, a copy, a collective) reads its
operands from device memory and writes its result there. Summing operand and result
bytes over those instructions gives the program's memory traffic per call, as XLA's
own cost model counts it, before caches. Memory-bound programs (ResNet training on
an H100 is one: BatchNorm, ReLU and residual passes dominate) run no faster than
``traffic / memory bandwidth``; a change that cuts traffic should cut step time.

Approximations: an operand is counted whole even where a fusion reads only a slice
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
FREE_OPCODES = {"call", "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id", "replica-id"}


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
    inside still move their bytes.
    """
    bodies, entry = _computations(hlo_text)

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
            instructions.append(m.groups())
        return instructions

    return walk(entry)


def entry_kernels(hlo_text: str) -> list[Kernel]:
    """The kernels of the entry computation of optimised HLO text (``compiled.as_text()``)."""
    sizes: dict[str, int] = {}
    kernels = []
    for name, shape, opcode, rest in entry_instructions(hlo_text):
        sizes[name] = shape_bytes(shape)
        if opcode in FREE_OPCODES or opcode.endswith("-done"):
            continue  # "-done" waits for its "-start" (async collective or copy), which moved the bytes
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        if opcode == "fusion":
            kind = "fusion:" + re.search(r"kind=(\w+)", rest).group(1)
        elif opcode == "custom-call":
            kind = re.search(r'custom_call_target="([^"]+)"', rest).group(1)
        else:
            kind = opcode
        op = re.search(r'op_name="([^"]*)"', rest)
        op_name = op.group(1) if op else ""
        phase = "backward" if "transpose(jvp(" in op_name else "forward" if "jvp(" in op_name else "other"
        read = sum(sizes.get(o, 0) for o in operands)
        kernels.append(Kernel(name, kind, phase, op_name, read, sizes[name]))
    return kernels


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
