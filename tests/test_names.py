"""Layer names against the C library: the exported identifiers the rule knows are the ones the
templates emit, and what this machine's standard and POSIX headers define or include is what
the rule refuses. Accepted names are compiled next to every such header: no redefinition."""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

from gncodegen.names import (DEFINED, EXPORTED_MACRO_SUFFIXES, EXPORTED_SYMBOL_SUFFIXES,
                             SHADOWED_HEADERS, exported, name_problem)
from gncodegen.render import template_dir

CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")

# Every header of ISO C (C23) and POSIX.1-2024, and the headers the generated code includes.
HEADERS = """
    assert.h complex.h ctype.h errno.h fenv.h float.h inttypes.h iso646.h limits.h locale.h
    math.h setjmp.h signal.h stdalign.h stdarg.h stdatomic.h stdbit.h stdbool.h stdckdint.h
    stddef.h stdint.h stdio.h stdlib.h stdnoreturn.h string.h tgmath.h threads.h time.h
    uchar.h wchar.h wctype.h
    aio.h arpa/inet.h cpio.h devctl.h dirent.h dlfcn.h endian.h fcntl.h fmtmsg.h fnmatch.h
    ftw.h glob.h grp.h iconv.h langinfo.h libgen.h libintl.h monetary.h mqueue.h ndbm.h
    net/if.h netdb.h netinet/in.h netinet/tcp.h nl_types.h poll.h pthread.h pwd.h regex.h
    sched.h search.h semaphore.h spawn.h strings.h sys/ipc.h sys/mman.h sys/msg.h
    sys/resource.h sys/select.h sys/sem.h sys/shm.h sys/socket.h sys/stat.h sys/statvfs.h
    sys/time.h sys/times.h sys/types.h sys/uio.h sys/un.h sys/utsname.h sys/wait.h syslog.h
    tar.h termios.h ulimit.h unistd.h utmpx.h wordexp.h sysexits.h
    immintrin.h
""".split()

# Names the rule accepts, chosen near its edges: single letters, the errno and stdint shapes
# it lets through, and the names the repository's examples and tests use.
ACCEPTED = """
    a b e g k m o q t u v y layer layer_norm gn enc encoder_gn decoder_gn_f64 s_u s_tiny
    matlab_gn nhwc_rowmajor sequence_cbt features_channelwise input interp int8 uint8 size
    pri scn is_x to_x str_x mem_x errors ok
    """.split()


@lru_cache(maxsize=None)
def available_headers() -> tuple[str, ...]:
    """Return the headers of HEADERS this machine's compiler can include on their own."""
    out = []
    for header in HEADERS:
        proc = subprocess.run([CC, "-D_GNU_SOURCE", "-fsyntax-only", "-x", "c", "-"],
                              input=f"#include <{header}>\n", capture_output=True, text=True)
        if proc.returncode == 0:
            out.append(header)
    return tuple(out)


def prelude() -> str:
    return ("#define _GNU_SOURCE 1\n#define __STDC_WANT_IEC_60559_TYPES_EXT__ 1\n"
            + "".join(f"#include <{h}>\n" for h in available_headers()))


def test_exported_identifiers_are_the_templates():
    """Every N_<word> and <N>_<WORD> the templates write is in the lists the rule checks."""
    macros, symbols = set(), set()
    for path in template_dir().rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            macros |= set(re.findall(r"\{\{ ?(?:M|plan\.macro) ?\}\}_([A-Za-z0-9_]+)", text))
            symbols |= set(re.findall(r"\{\{ ?(?:P|plan\.prefix) ?\}\}_([A-Za-z0-9_]+)", text))
    assert macros and symbols
    # A name the template completes (<N>_MAX_{{ size }}): the list holds its family.
    listed = set(EXPORTED_MACRO_SUFFIXES)
    families = {m for m in macros if m.endswith("_")}
    assert all(any(s.startswith(m) for s in listed) for m in families), families
    macros -= families
    assert macros <= listed, macros - listed
    listed = set(EXPORTED_SYMBOL_SUFFIXES)
    families = {s for s in symbols if s.endswith("_")}   # <n>_cuda_{{ solver }}_update
    assert all(any(s.startswith(f) for s in listed) for f in families), families
    symbols -= families
    assert symbols <= listed, symbols - listed


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_names(name):
    assert name_problem(name) is None


@needs_cc
def test_macros_the_headers_define_are_refused():
    """For every macro <P>_<SUFFIX> the standard and POSIX headers define, the name P is
    refused (P_OK, P_EPSILON, P_H, ...)."""
    proc = subprocess.run([CC, "-E", "-dM", "-x", "c", "-"], input=prelude(),
                          capture_output=True, text=True, check=True)
    defined = set(re.findall(r"#define ([A-Za-z_]\w*)", proc.stdout))
    missed = []
    for macro in sorted(defined):
        for suffix in EXPORTED_MACRO_SUFFIXES:
            prefix = macro[: -len(suffix) - 1]
            if macro.endswith("_" + suffix) and prefix and not prefix.startswith("_"):
                if name_problem(prefix.lower()) is None:
                    missed.append(macro)
    assert not missed, f"names exporting these macros are accepted: {missed}"


@needs_cc
def test_accepted_names_compile_beside_every_header():
    """Each exported identifier of each accepted name is undefined after every header, and
    declaring it (as the generated code does) conflicts with nothing they declare."""
    lines = [prelude()]
    for name in ACCEPTED:
        macros, symbols = exported(name)
        for ident in macros + symbols:
            lines.append(f"#ifdef {ident}\n#error {ident} is defined by a header\n#endif\n")
        for ident in symbols:
            lines.append(f"extern const volatile struct gn_probe_{ident} *{ident};\n")
    proc = subprocess.run([CC, "-fsyntax-only", "-x", "c", "-"], input="".join(lines),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@needs_cc
def test_defined_list_is_real_here():
    """Each identifier the rule says a header defines is defined by that header, where this
    machine has it (the list is not guesswork)."""
    checked = 0
    for ident, header in DEFINED.items():
        src = (f"#define _GNU_SOURCE 1\n#define __STDC_WANT_IEC_60559_TYPES_EXT__ 1\n"
               f"#include <{header}>\n#ifndef {ident}\n#error\n#endif\n")
        if ident == ident.lower() or " " in header:   # a type, or another machine's header
            continue
        if subprocess.run([CC, "-fsyntax-only", "-x", "c", "-"], capture_output=True,
                          input=f"#include <{header}>\n", text=True).returncode:
            continue
        proc = subprocess.run([CC, "-fsyntax-only", "-x", "c", "-"], input=src,
                              capture_output=True, text=True)
        enum = ident in ("PS_OK", "TD_OK", "MCHECK_OK")    # enumerators, not macros
        assert enum or proc.returncode == 0, f"<{header}> does not define {ident}"
        checked += 1
    assert checked >= 10


@needs_cc
def test_headers_the_standard_headers_include_are_shadow_listed():
    """Every header a standard or POSIX header pulls in from the top of an include folder
    (features.h, alloca.h, endian.h, ...) is one a layer may not be named after."""
    proc = subprocess.run([CC, "-D_GNU_SOURCE", "-M", "-x", "c", "-"], input=prelude(),
                          capture_output=True, text=True, check=True)
    includes = subprocess.run([CC, "-E", "-Wp,-v", "-x", "c", "/dev/null"],
                              capture_output=True, text=True).stderr
    dirs = {Path(line.strip()).resolve() for line in includes.splitlines()
            if line.startswith(" /")}
    missed = set()
    for dep in proc.stdout.replace("\\\n", " ").split()[1:]:
        path = Path(dep).resolve()
        if path.suffix == ".h" and path.parent in dirs:
            stem = path.stem
            if (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", stem)
                    and stem.lower() not in SHADOWED_HEADERS):
                missed.add(stem)
    assert not missed, f"layers named {sorted(missed)} would shadow a system header"


@pytest.mark.parametrize("name", sorted(SHADOWED_HEADERS))
def test_shadowed_headers_are_refused(name):
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        pytest.skip("not an identifier")
    assert name_problem(name) is not None
