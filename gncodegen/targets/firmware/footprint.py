"""What a layer's kernel costs on a core: section bytes, worst stack depth and outside calls."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from ...build import cache_root, compiler_version, content_key, run_compiler, write_sources
from ...errors import GncodegenError
from ...plan import Plan
from ...render import Source
from .boards import BOARDS, FOOTPRINT_OPT, FOOTPRINT_TARGET, STACK_BUDGET, TEXT_BUDGET, Board, require_tool
from .strict import STRICT_C_FLAGS


# A training layer's entry points besides predict, by the name after the layer's prefix: the
# footprint lists them apart from the prediction kernel, which its budgets hold alone.
TRAINING_ENTRIES = ("forward_train", "backward", "sgdm_update", "adam_update", "rmsprop_update")


@dataclass(frozen=True)
class EntryFootprint:
    """What one training entry point costs beside the prediction kernel."""

    name: str          # after the layer's prefix: forward_train, backward, sgdm_update, ...
    text: int          # code it reaches that prediction does not: its own function and the
                       # helpers only training calls (shared with another entry: in both)
    stack: int         # deepest path from it, in bytes (outside callees count 0)
    calls: tuple[str, ...]   # functions outside the object it reaches
    stack_measured: int | None = None  # deepest stack its calls used in the training image

    def as_dict(self) -> dict:
        """Return the figures as plain data for the manifest."""
        return {"text": self.text, "stack": self.stack, "calls": list(self.calls),
                **({} if self.stack_measured is None else
                   {"stack_measured": self.stack_measured})}


@dataclass(frozen=True)
class Footprint:
    """What one layer's kernel costs on a core: section bytes, stack depth and outside calls.

    A training layer's object also holds its training entry points: text, stack and calls
    are the prediction kernel's alone (everything predict and predict_with_params reach, and
    anything no training entry point alone reaches), the training code is in `training`.
    """

    layer: str
    cpu: str
    opt: str
    text: int          # code, with its literal pools
    rodata: int        # constants other than the learned parameters
    data: int
    bss: int
    params: int        # <name>_scale and <name>_offset, in flash
    stack: int         # deepest path from an entry point, in bytes
    calls: tuple[str, ...]   # functions called outside the layer's object
    stack_measured: int | None = None  # deepest stack the verification image's calls used
    instructions: int | None = None    # instructions one observation ran in that image
    training: tuple[EntryFootprint, ...] = ()   # a training layer's entry points, in order
    training_text: int = 0   # the code only training reaches, each function counted once

    def as_dict(self) -> dict:
        """Return the figures as plain data for the manifest."""
        return {"cpu": self.cpu, "opt": self.opt, "text": self.text, "rodata": self.rodata,
                "data": self.data, "bss": self.bss, "params": self.params,
                "stack": self.stack, "calls": list(self.calls),
                **({} if self.stack_measured is None else
                   {"stack_measured": self.stack_measured}),
                **({} if self.instructions is None else
                   {"instructions_per_observation": self.instructions}),
                **({} if not self.training else
                   {"training": {"text": self.training_text,
                                 "entry_points": {e.name: e.as_dict()
                                                  for e in self.training}}})}

    @classmethod
    def from_dict(cls, layer: str, record: dict) -> Footprint:
        """Return the footprint as_dict gave (the cache keeps it so)."""
        plain = {k: v for k, v in record.items()
                 if k not in ("calls", "training", "instructions_per_observation")}
        training = record.get("training", {"text": 0, "entry_points": {}})
        return cls(layer=layer, **plain, calls=tuple(record["calls"]),
                   instructions=record.get("instructions_per_observation"),
                   training=tuple(EntryFootprint(name, e["text"], e["stack"],
                                                 tuple(e["calls"]), e.get("stack_measured"))
                                  for name, e in training["entry_points"].items()),
                   training_text=training["text"])

    def with_training_measured(self, depths: dict[str, int]) -> Footprint:
        """Return the footprint with the stack each training entry point used in the image."""
        return replace(self, training=tuple(replace(e, stack_measured=depths.get(e.name))
                                            for e in self.training))

    def budget_applies(self, dtype: str) -> bool:
        """True where the text and stack budgets are set: single precision on the Cortex-M4 at
        -Os (a core without an FPU, say, spends its text on calls and its stack on frames)."""
        return dtype == "single" and (self.cpu, self.opt) == (FOOTPRINT_TARGET, FOOTPRINT_OPT)

    def over_budget(self, dtype: str, text_budget: int = TEXT_BUDGET,
                    stack_budget: int = STACK_BUDGET) -> list[str]:
        """Return the budgets this footprint breaks, in words: no RAM of its own anywhere, and
        the text and stack budgets where they apply (budget_applies)."""
        problems = []
        if self.data or self.bss:
            problems.append(f"{self.data + self.bss} bytes of RAM (.data/.bss); the kernel "
                            "must keep none")
        if self.budget_applies(dtype):
            if self.text > text_budget:
                problems.append(f"text {self.text} B > {text_budget} B")
            if self.stack > stack_budget:
                problems.append(f"stack {self.stack} B > {stack_budget} B")
            elif (self.stack_measured or 0) > stack_budget:
                problems.append(f"stack {self.stack_measured} B measured under QEMU (with "
                                f"{', '.join(self.calls) or 'no outside calls'}) > "
                                f"{stack_budget} B")
        return problems


# What a layer's object may call: the square root of its precision, and the memory functions a
# compiler may emit even for freestanding code. Double precision on a core without a
# double-precision FPU also calls the run-time library's soft-float helpers.
ALLOWED_CALLS = {"single": frozenset({"sqrtf"}), "double": frozenset({"sqrt"})}
COMPILER_CALLS = frozenset({"memcpy", "memset", "memmove",
                            # integer division on a core without a divider (Armv6-M)
                            "__aeabi_idiv", "__aeabi_idivmod", "__aeabi_uidiv",
                            "__aeabi_uidivmod"})
# __aeabi_dmul, __aeabi_f2d, ... (Arm); __muldf3, __extendsfdf2, __ltdf2, ... (libgcc, RISC-V)
SOFT_DOUBLE_HELPER = re.compile(r"__aeabi_(d\w+|\w*2d)\Z|__\w*df\d?\Z|__\w*df\w*[23]\Z")
# A core without an FPU does float arithmetic in these (the run-time ABI's helpers): allowed
# there, for the precision's own type only (__aeabi_fmul, __aeabi_fcmplt, __aeabi_i2f, ...;
# not __aeabi_f2d).
SOFT_FLOAT_HELPER = re.compile(r"__aeabi_(f(add|sub|rsub|mul|div|cmp\w+|2u?iz|2u?lz)|u?[il]2f)\Z")


def footprint_flags(target: Board, opt: str = FOOTPRINT_OPT) -> tuple[str, ...]:
    """Return the flags a footprint is measured with (the manifest records them)."""
    return (*STRICT_C_FLAGS, opt, *target.cpu_flags, "-ffunction-sections", "-fdata-sections")


def measure_footprint(plan: Plan, source: Source, header: Source,
                      target: Board | None = None, opt: str = FOOTPRINT_OPT
                      ) -> Footprint:
    """Return the footprint of one layer's compiled source (Cortex-M4F at -Os by default).

    Sections come from the ELF object built with -ffunction-sections -fdata-sections,
    so the parameters' .rodata.<name>_scale/_offset are told apart; the stack depth is the
    deepest path through the -fcallgraph-info call graph, each function's -fstack-usage frame
    added (outside callees such as sqrtf count 0 and are listed in `calls`; the verification
    image measures the real depth, callees included, as stack_measured).

    A training layer's functions are told apart by the object's relocations (code_graph): the
    code only its training entry points reach is listed per entry point in `training`, and
    text and calls stay the prediction kernel's.
    """
    target = target or BOARDS[FOOTPRINT_TARGET]
    require_tool(target.cc)
    obj = source.name[:-2] + ".o"
    command = [target.cc, *footprint_flags(target, opt), "-fstack-usage",
               "-fcallgraph-info=su", "-c", source.name, "-o", obj]
    key = content_key(["footprint-elf-2", compiler_version(target.cc), *command, header.text,
                       source.text])
    cached = cache_root() / "footprint" / f"{key}.json"
    if cached.is_file():
        record = json.loads(cached.read_text())
        return Footprint.from_dict(record.pop("layer"), record)
    with tempfile.TemporaryDirectory(prefix="gncodegen-footprint-") as tmp:
        work = Path(tmp)
        write_sources(work, [header, source])
        run_compiler(f"{source.name} (footprint, {target.name} {opt})", command, cwd=work)
        sections = elf_sections(work / obj)
        undefined = elf_undefined(work / obj)
        graph = code_graph(work / obj)
        frames = _stack_usage((work / (obj[:-2] + ".su")).read_text())
        edges = _call_edges((work / (obj[:-2] + ".ci")).read_text())
    p = plan.prefix
    params_names = {f".rodata.{p}_{which}" for which in ("scale", "offset", "initial_scale",
                                                         "initial_offset")}
    text = sum(v for k, v in sections.items() if k == ".text" or k.startswith(".text."))
    params = sum(v for k, v in sections.items() if k in params_names)
    rodata = sum(v for k, v in sections.items()
                 if (k == ".rodata" or k.startswith(".rodata.")) and k not in params_names)
    data = sum(v for k, v in sections.items() if k == ".data" or k.startswith(".data."))
    bss = sum(v for k, v in sections.items() if k == ".bss" or k.startswith(".bss.")
              or k == "COMMON")
    entries = [f"{p}_predict", f"{p}_predict_with_params"]
    stack = max(_deepest(e, frames, edges, ()) for e in entries)
    training, training_text, calls = (), 0, tuple(sorted(undefined))
    if plan.layer.training:
        predicted = graph.reach(entries)
        trained = graph.reach([f"{p}_{e}" for e in TRAINING_ENTRIES]) - predicted
        training_text = graph.size(trained)
        text -= training_text
        # Every outside call but those only training code makes.
        only_trained = graph.calls(trained) - graph.calls(graph.sections() - trained)
        calls = tuple(sorted(undefined - only_trained))
        training = tuple(
            EntryFootprint(e, graph.size(reached & trained),
                           _deepest(f"{p}_{e}", frames, edges, ()),
                           tuple(sorted(graph.calls(reached))))
            for e in TRAINING_ENTRIES for reached in [graph.reach([f"{p}_{e}"])])
    fp = Footprint(p, target.name, opt, text, rodata, data, bss, params, stack, calls,
                   training=training, training_text=training_text)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{cached.name}.{os.getpid()}")
    partial.write_text(json.dumps({"layer": fp.layer, **fp.as_dict()}))
    os.replace(partial, cached)      # atomic: a parallel reader never sees half a record
    return fp


# What a training layer's entry points may call beyond its prediction kernel: the precision's
# pow (Adam's bias correction), fabs (the large-mean test of backward) and square root, and in
# double the math functions of the activation's derivative (common/activation.j2; single
# precision has its own e^x and erf there too).
TRAINING_CALLS = {"single": frozenset({"powf", "fabsf", "sqrtf"}),
                  "double": frozenset({"pow", "fabs", "sqrt"})}
DERIVATIVE_LIBM = {"elu": ("exp",), "swish": ("exp",), "sigmoid": ("exp",), "tanh": ("tanh",)}
GELU_DERIVATIVE_LIBM = {"none": ("erf", "exp"), "tanh": ("tanh",)}


def training_calls(layer) -> frozenset[str]:
    """Return what a layer's training entry points may call beyond what its prediction kernel
    may (none for a layer without training)."""
    if not layer.training:
        return frozenset()
    act = layer.activation
    derivative = (GELU_DERIVATIVE_LIBM[act.approximation] if act.kind == "gelu"
                  else DERIVATIVE_LIBM.get(act.kind, ()))
    return TRAINING_CALLS[layer.dtype] | (frozenset(derivative) if layer.dtype == "double"
                                          else frozenset())


def activation_calls(activation, dtype: str) -> frozenset[str]:
    """Return the math functions a fused activation calls in a precision: none in single (the
    source has its own e^x and erf), exp, expm1, erf or tanh in double."""
    if dtype == "single":
        return frozenset()
    return frozenset(activation.libm)


def check_object_calls(fp: Footprint, dtype: str, soft_float: bool = False,
                       activation_allows: frozenset[str] = frozenset(),
                       training_allows: frozenset[str] | None = None) -> list[str]:
    """Return the outside calls a layer must not make (empty when all are allowed).

    Single precision may call sqrtf and nothing else: no double arithmetic helpers
    (__aeabi_d*), no sqrt, no heap, no I/O; on a core without an FPU also the float helpers
    (__aeabi_f*); a fused activation also the math functions it needs (activation_allows).
    A training layer's entry points may also call what training adds (training_allows: its
    training_calls; by default the precision's pow, fabs and square root, which is all of it
    but for the derivative of an activation in double); the prediction kernel may not, even
    in that object.
    """
    if training_allows is None:
        training_allows = TRAINING_CALLS[dtype]
    allowed = ALLOWED_CALLS[dtype] | COMPILER_CALLS | activation_allows
    helpers = [SOFT_DOUBLE_HELPER] if dtype == "double" else []
    if soft_float:
        helpers.append(SOFT_FLOAT_HELPER)

    def refused(calls, allow):
        return [s for s in calls if s not in allow and not any(h.match(s) for h in helpers)]

    bad = refused(fp.calls, allowed)
    for entry in fp.training:
        bad += [s for s in refused(entry.calls, allowed | training_allows) if s not in bad]
    return bad


def elf_sections(path: Path) -> dict[str, int]:
    """Return section name -> bytes of the allocated sections of an ELF object, and COMMON
    (the bytes of common symbols, which take .bss space once linked)."""
    out: dict[str, int] = {}
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        for sec in elf.iter_sections():
            if sec["sh_flags"] & SH_FLAGS.SHF_ALLOC and sec["sh_size"]:
                out[sec.name] = out.get(sec.name, 0) + sec["sh_size"]
        common = sum(sym["st_size"] for sym in _symbols(elf) if sym["st_shndx"] == "SHN_COMMON")
    if common:
        out["COMMON"] = common
    return out


def elf_undefined(path: Path) -> set[str]:
    """Return the names of the symbols an ELF object uses but does not define."""
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        return {sym.name for sym in _symbols(elf) if sym["st_shndx"] == "SHN_UNDEF" and sym.name}


@dataclass(frozen=True)
class CodeGraph:
    """An object's code as its relocations link it: each code section (one function under
    -ffunction-sections), its bytes, what it refers to and the outside symbols it uses."""

    sizes: dict[int, int]                  # code section index -> bytes
    functions: dict[str, int]              # function -> the code section holding it
    refs: dict[int, frozenset[int]]        # section index -> code sections it refers to
    outside: dict[int, frozenset[str]]     # section index -> undefined symbols it uses

    def sections(self) -> frozenset[int]:
        """Every section that uses something: code, and data that holds addresses."""
        return frozenset(self.sizes) | frozenset(self.outside)

    def reach(self, functions) -> frozenset[int]:
        """Return the code sections the named functions reach (themselves included); a name
        the object does not define is an error."""
        missing = [f for f in functions if f not in self.functions]
        if missing:
            raise GncodegenError(f"the object defines no {', '.join(missing)}")
        seen: set[int] = set()
        todo = [self.functions[f] for f in functions]
        while todo:
            sec = todo.pop()
            if sec not in seen:
                seen.add(sec)
                todo.extend(self.refs.get(sec, ()))
        return frozenset(seen)

    def size(self, sections) -> int:
        """Return the bytes of the given code sections."""
        return sum(self.sizes.get(s, 0) for s in sections)

    def calls(self, sections) -> frozenset[str]:
        """Return the outside symbols the given sections use."""
        return frozenset(n for s in sections for n in self.outside.get(s, ()))


def code_graph(path: Path) -> CodeGraph:
    """Return the CodeGraph of an ELF object: what each code section refers to, from its
    relocations (a call, a branch, an address in a literal pool), whether through the
    function's own symbol or its section's."""
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        sizes, functions = {}, {}
        for index, sec in enumerate(elf.iter_sections()):
            if (sec["sh_flags"] & SH_FLAGS.SHF_ALLOC and sec["sh_flags"] & SH_FLAGS.SHF_EXECINSTR
                    and sec["sh_size"]):
                sizes[index] = sec["sh_size"]
        for sym in _symbols(elf):
            if sym["st_info"]["type"] == "STT_FUNC" and sym["st_shndx"] in sizes:
                functions[sym.name] = sym["st_shndx"]
        refs: dict[int, set[int]] = {}
        outside: dict[int, set[str]] = {}
        for sec in elf.iter_sections():
            if not isinstance(sec, RelocationSection) or not sec["sh_info"]:
                continue
            owner = sec["sh_info"]
            table = elf.get_section(sec["sh_link"])
            for rel in sec.iter_relocations():
                sym = table.get_symbol(rel["r_info_sym"])
                where = sym["st_shndx"]
                if where == "SHN_UNDEF":
                    if sym.name:
                        outside.setdefault(owner, set()).add(sym.name)
                elif where in sizes and where != owner:
                    refs.setdefault(owner, set()).add(where)
    return CodeGraph(sizes, functions, {k: frozenset(v) for k, v in refs.items()},
                     {k: frozenset(v) for k, v in outside.items()})


def _symbols(elf: ELFFile):
    table = elf.get_section_by_name(".symtab")
    return list(table.iter_symbols()) if isinstance(table, SymbolTableSection) else []


def _stack_usage(su_text: str) -> dict[str, int]:
    """Return function -> frame bytes from a -fstack-usage file; a dynamic frame is an error."""
    frames = {}
    for line in su_text.splitlines():
        where, size, kind = line.rsplit("\t", 2)
        func = where.rsplit(":", 1)[-1]
        if "dynamic" in kind and "bounded" not in kind:
            raise GncodegenError(f"{func}: stack frame is dynamic ({kind}); the generated "
                                 "code must use fixed frames (no VLAs or alloca)")
        frames[func] = int(size)
    return frames


_EDGE = re.compile(r'edge: \{ sourcename: "([^"]+)" targetname: "([^"]+)"')


def _call_edges(ci_text: str) -> dict[str, tuple[str, ...]]:
    """Return caller -> callees from a -fcallgraph-info file."""
    edges: dict[str, list[str]] = {}
    for caller, callee in _EDGE.findall(ci_text):
        # A static function is named "<file>:<name>" there, as -fstack-usage's frames are not.
        edges.setdefault(_bare(caller), []).append(_bare(callee))
    return {k: tuple(v) for k, v in edges.items()}


def _bare(name: str) -> str:
    """Return a call graph node's function name without its file."""
    return name.rsplit(":", 1)[-1]


def _deepest(func: str, frames: dict[str, int], edges: dict[str, tuple[str, ...]],
             path: tuple[str, ...]) -> int:
    """Return the deepest stack from func down; raise on recursion (a cycle in the graph)."""
    if func in path:
        cycle = " -> ".join((*path[path.index(func):], func))
        raise GncodegenError(f"recursion in the generated code: {cycle}")
    own = frames.get(func, 0)
    callees = edges.get(func, ())
    return own + max((_deepest(c, frames, edges, (*path, func)) for c in callees), default=0)


@dataclass(frozen=True)
class FootprintRow:
    """One line of the footprint table: a layer's footprint and what it is held against."""

    footprint: Footprint
    buffers: int | None              # bytes of x and y the caller holds per observation (at
                                     # the bounds of runtime sizes; None: one is unbounded)
    budget: tuple[int, int] | None   # (text, stack) where a budget applies


def footprint_table(rows_in: list[FootprintRow]) -> list[str]:
    """Return the footprint table the CLI prints, one line per layer."""
    rows = [["layer", "cpu", "opt", "text", "rodata", "data", "bss", "params", "stack",
             "ran", "buffers", "budget", "insns", "calls"]]
    for row in rows_in:
        fp = row.footprint
        ran = "-" if fp.stack_measured is None else str(fp.stack_measured)
        budget = "-" if row.budget is None else f"{row.budget[0]}/{row.budget[1]}"
        insns = "-" if fp.instructions is None else str(fp.instructions)
        rows.append([fp.layer, fp.cpu, fp.opt, str(fp.text), str(fp.rodata), str(fp.data),
                     str(fp.bss), str(fp.params), str(fp.stack), ran, "-" if row.buffers is None else str(row.buffers), budget,
                     insns, ", ".join(fp.calls) or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if 3 <= i <= 12 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    return ["footprint (bytes; params: the static const scale/offset, in flash; stack: deepest "
            "call path from -fstack-usage; ran: deepest stack measured under QEMU; buffers: x "
            "and y per observation; budget: text/stack, where set; insns: instructions one "
            "observation ran under QEMU -icount, not cycles):", *lines,
            *training_table(rows_in)]


def training_table(rows_in: list[FootprintRow]) -> list[str]:
    """Return the table of the training layers' entry points, one line per entry point and a
    line of their code together, apart from the prediction kernels above (no lines when no
    layer trains)."""
    rows = [["layer", "cpu", "opt", "entry point", "text", "stack", "ran", "calls"]]
    for row in rows_in:
        fp = row.footprint
        for e in fp.training:
            rows.append([fp.layer, fp.cpu, fp.opt, f"{fp.layer}_{e.name}", str(e.text),
                         str(e.stack), "-" if e.stack_measured is None else str(e.stack_measured),
                         ", ".join(e.calls) or "-"])
        if fp.training:
            rows.append([fp.layer, fp.cpu, fp.opt, "(together)", str(fp.training_text), "-",
                         "-", ", ".join(sorted({c for e in fp.training for c in e.calls}))
                         or "-"])
    if len(rows) == 1:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if 4 <= i <= 6 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    return ["training entry points, apart from the kernel (bytes; text: the code only training "
            "reaches, each entry point's own and its helpers; together: all of it, shared "
            "helpers once; stack: deepest call path; ran: deepest stack measured under QEMU; "
            "no budget applies):", *lines]
