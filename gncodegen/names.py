"""Layer names: what a name exports into C, and the names C, C++, POSIX and the libraries take.

A layer named N writes N.h and N.c (and N_cuda.h, N.cu, N_harness.*) and exports, besides
its functions, macros made from N in upper case. A name is refused when

* it is not a C identifier, is a C or C++ keyword, or is longer than MAX_NAME_LENGTH;
* an identifier it exports is reserved by the languages themselves: a leading underscore
  (C reserves those at file scope, ``_A_OK`` everywhere) and ``__`` anywhere (C++), which
  a trailing underscore would make (``a_`` exports ``a__predict``);
* N.h would shadow a header of the C standard library, POSIX, glibc, newlib, the compilers'
  own include folders, CUDA or Python wherever the output folder is on the include path
  (SHADOWED_HEADERS), or N.c would replace a support file of gncodegen's builds;
* an exported identifier is one that a standard or system header defines (DEFINED: ``x``
  exports X_OK, which <unistd.h> defines for access(); ``flt`` exports FLT_EPSILON);
* an exported identifier falls in a family of names that C or POSIX reserves for their
  headers (MACRO_FAMILIES, SYMBOL_FAMILIES): ``sigma`` exports SIGMA_OK, and <signal.h> may
  define any SIG followed by a capital letter.

Two reservations are not applied, and why. C lets <errno.h> add any macro E followed by a
digit or capital letter: every name beginning with e and a letter (``encoder``) would go,
while every errno constant of C, POSIX, glibc, newlib and musl is one word without an
underscore and every macro a layer exports has one after the name, so none can be an errno
constant. POSIX reserves single-letter prefixes (``S_``, ``O_``, ``F_``, ``M_`` and,
for <termios.h> and <sys/wait.h>, every macro beginning with V, I, O, TC or W and a capital):
applying them would refuse most words; the identifiers those headers actually define are in
DEFINED (X_OK, F_OK), and the families of two or more letters are in the lists.

DEFINED and SHADOWED_HEADERS were built from the headers of glibc 2.36 and linux-libc-dev,
GCC 12 (x86-64 and arm-none-eabi, with newlib) and CUDA 13: every header they install at the
top level of an include folder, and every macro or declaration they define whose name ends in
a suffix of EXPORTED_MACRO_SUFFIXES or EXPORTED_SYMBOL_SUFFIXES.
"""

from __future__ import annotations

import re

from .errors import SpecError
from .text import preview

MAX_NAME_LENGTH = 48
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# C89/C99/C11/C23 keywords plus C++ keywords: the header must also be valid C++.
C_KEYWORDS = frozenset(
    """
    auto break case char const continue default do double else enum extern float for goto if
    inline int long register restrict return short signed sizeof static struct switch typedef
    union unsigned void volatile while _Alignas _Alignof _Atomic _BitInt _Bool _Complex
    _Decimal128 _Decimal32 _Decimal64 _Generic _Imaginary _Noreturn _Static_assert
    _Thread_local alignas alignof and and_eq asm bitand bitor bool catch char8_t char16_t
    char32_t class co_await co_return co_yield compl concept consteval constexpr constinit
    const_cast decltype delete dynamic_cast explicit export false friend mutable namespace new
    noexcept not not_eq nullptr operator or or_eq private protected public reinterpret_cast
    requires static_assert static_cast template this thread_local throw true try typeid
    typename typeof typeof_unqual using virtual wchar_t xor xor_eq
    """.split()
)

# What a layer named N exports, as N_<suffix> (functions, arrays: N in lower case) and
# <N upper>_<suffix> (macros and include guards), in every target's templates.
EXPORTED_MACRO_SUFFIXES = (
    "OK", "ERR_NULL", "ERR_BATCH", "ERR_SIZE", "NUM_CHANNELS", "NUM_GROUPS", "EPSILON",
    "OBSERVATION_NUMEL", "H", "H_", "CUDA_H", "CUDA_MAX_BATCH", "CUDA_NUM_CHANNELS",
    "CUDA_NUM_GROUPS", "CUDA_EPSILON", "CUDA_OBSERVATION_NUMEL", "ALWAYS_INLINE", "AVX512",
    "INDEPENDENT", "JOBS_PER_OBSERVATION", "MAC", "UNROLLED", "INV_GROUP_NUMEL", "LARGEST",
    "RESCUE_EPSILON", "RESCUE_UNIT", "SAFE_SCALE", "FIXED_NUMEL", "CUDA_FIXED_NUMEL",
    # training layers
    "ERR_STEP", "JOB_INLINE", "TRAIN_MAC", "NOINLINE", "SCALE_LEARN_RATE_FACTOR", "OFFSET_LEARN_RATE_FACTOR", "SCALE_L2_FACTOR",
    "OFFSET_L2_FACTOR",
    # the bounds of runtime sizes, named by label and rank
    *(f"{cuda}MAX_{size}" for cuda in ("", "CUDA_")
      for size in ("S1", "S2", "S3", "T", *(f"U{k}" for k in range(1, 8)))),
)
EXPORTED_SYMBOL_SUFFIXES = (
    "predict", "predict_with_params", "cuda_predict", "cuda_predict_with_params", "scale",
    "offset", "block_sums", "cuda", "finish", "group_apply", "group_sums", "groups", "job",
    "lane_sums", "order", "pilot", "split_mean", "sqrt", "stats", "sum_groups", "sum_pair",
    "fold", "scales_fold", "wide_job",
    "tiny_groups", "activate", "exp_neg",
    # training layers
    "forward_train", "backward", "sgdm_update", "adam_update", "rmsprop_update",
    "initial_scale", "initial_offset", "activate_grad", "backward_job", "backward_group",
    "run_sums", "backward_rows", "sgdm_step", "adam_step", "rmsprop_step", "cuda_forward_train",
    "cuda_backward", "cuda_sgdm_update", "cuda_adam_update", "cuda_rmsprop_update",
)

_C_STANDARD = """
    assert complex ctype errno fenv float inttypes iso646 limits locale math setjmp signal
    stdalign stdarg stdatomic stdbit stdbool stdckdint stddef stdint stdio stdlib stdnoreturn
    string tgmath threads time uchar wchar wctype
"""
_POSIX = """
    aio arpa cpio devctl dirent dlfcn endian fcntl fmtmsg fnmatch ftw glob grp iconv langinfo
    libgen libintl monetary mqueue ndbm net netdb netinet nl_types poll pthread pwd regex
    sched search semaphore spawn strings stropts sys syslog tar termios trace ulimit unistd
    utime utmpx wordexp
"""
_GLIBC = """
    aliases alloca ar argp argz bits byteswap elf envz err error execinfo features fstab fts
    gconv getopt gnu gshadow ifaddrs lastlog link malloc mcheck memory mntent netash netatalk
    netax25 neteconet netipx netiucv netpacket netrom netrose nss obstack paths printf
    proc_service pty re_comp regexp resolv sgtty shadow stab stdio_ext syscall sysexits
    termio thread_db ttyent ucontext utmp values wait fpu_control ieee754 asm linux
"""
_NEWLIB = """
    _ansi _newlib_version _syslist envlock fastmath ieeefp machine newlib reent regdef ssp
    unctrl
"""
_COMPILERS = """
    acc_prof adxintrin ammintrin amxbf16intrin amxint8intrin amxtileintrin avx2intrin
    avx5124fmapsintrin avx5124vnniwintrin avx512bf16intrin avx512bf16vlintrin
    avx512bitalgintrin avx512bwintrin avx512cdintrin avx512dqintrin avx512erintrin
    avx512fintrin avx512fp16intrin avx512fp16vlintrin avx512ifmaintrin avx512ifmavlintrin
    avx512pfintrin avx512vbmi2intrin avx512vbmi2vlintrin avx512vbmiintrin avx512vbmivlintrin
    avx512vlbwintrin avx512vldqintrin avx512vlintrin avx512vnniintrin avx512vnnivlintrin
    avx512vp2intersectintrin avx512vp2intersectvlintrin avx512vpopcntdqintrin
    avx512vpopcntdqvlintrin avxintrin avxvnniintrin backtrace bmi2intrin bmiintrin
    bmmintrin cet cetintrin cldemoteintrin clflushoptintrin clwbintrin clzerointrin cpuid
    emmintrin enqcmdintrin f16cintrin fma4intrin fmaintrin fxsrintrin gcov gfniintrin
    hresetintrin ia32intrin immintrin keylockerintrin lwpintrin lzcntintrin mm3dnow
    mm_malloc mmintrin movdirintrin mwaitintrin mwaitxintrin nmmintrin omp openacc
    pconfigintrin pkuintrin pmmintrin popcntintrin prfchwintrin quadmath quadmath_weak
    rdseedintrin rtmintrin serializeintrin sgxintrin shaintrin smmintrin stdfix syslimits
    tbmintrin tmmintrin tsxldtrkintrin uintrintrin unwind vaesintrin varargs
    vpclmulqdqintrin waitpkgintrin wbnoinvdintrin wmmintrin x86gprintrin x86intrin
    xmmintrin xopintrin xsavecintrin xsaveintrin xsaveoptintrin xsavesintrin xtestintrin
    arm_acle arm_bf16 arm_cde arm_cmse arm_fp16 arm_mve arm_mve_types arm_neon
"""
_CUDA_PYTHON = """
    builtin_types channel_descriptor cooperative_groups cuda cuda_bf16
    cuda_device_runtime_api cuda_fp16 cuda_fp4 cuda_fp6 cuda_fp8 cuda_runtime
    cuda_runtime_api device_atomic_functions device_launch_parameters device_types
    driver_functions driver_types library_types sm_20_atomic_functions sm_20_intrinsics
    sm_30_intrinsics sm_32_atomic_functions sm_32_intrinsics sm_35_atomic_functions
    sm_35_intrinsics sm_60_atomic_functions sm_61_intrinsics surface_indirect_functions
    surface_types texture_indirect_functions texture_types vector_functions vector_types
    python pyconfig
"""
# A layer named like a header that generated, system or user code includes with <...> would
# write <name>.h that shadows it wherever the output folder is on the include path.
SHADOWED_HEADERS = frozenset(
    (_C_STANDARD + _POSIX + _GLIBC + _NEWLIB + _COMPILERS + _CUDA_PYTHON).split())
# gncodegen's own files in the build folders: <name>.h or <name>.c would replace them.
SUPPORT_FILES = frozenset("fw_io fw_count_systick fw_count_riscv hosted_io semihosting "
                          "startup_cortex_m gn_cuda_emulation".split())

# Identifiers a layer could export that system headers define: identifier -> header (with
# whose it is when only one C library or compiler has it).
_DEFINED_BY_HEADER = {
    "unistd.h": "F_OK R_OK W_OK X_OK",
    "float.h": "FLT_EPSILON DBL_EPSILON LDBL_EPSILON FLT128_EPSILON",
    "stdfix.h": "ACCUM_EPSILON FRACT_EPSILON LACCUM_EPSILON LFRACT_EPSILON LLACCUM_EPSILON "
                "LLFRACT_EPSILON SACCUM_EPSILON SFRACT_EPSILON UACCUM_EPSILON UFRACT_EPSILON "
                "ULACCUM_EPSILON ULFRACT_EPSILON ULLACCUM_EPSILON ULLFRACT_EPSILON "
                "USACCUM_EPSILON USFRACT_EPSILON",
    "sysexits.h": "EX_OK",
    "fmtmsg.h": "MM_OK",
    "sys/timex.h": "TIME_OK",
    "proc_service.h": "PS_OK",
    "thread_db.h": "TD_OK",
    "mcheck.h": "MCHECK_OK",
    "argp.h": "ARGP_HELP_EXIT_OK",
    "arpa/telnet.h": "TELCMD_OK AUTHTYPE_NAME_OK ENCRYPT_NAME_OK ENCTYPE_NAME_OK SLC_NAME_OK",
    "arpa/nameser.h": "NS_OPT_DNSSEC_OK",
    "linux/fanotify.h": "FAN_EVENT_OK",
    "newlib's getopt.h": "GETOPT_H",
    "backtrace.h": "BACKTRACE_H",
    "quadmath.h": "QUADMATH_H",
    "quadmath_weak.h": "QUADMATH_WEAK_H",
    "gcov.h": "GCC_GCOV_H",
    "linux/soundcard.h": "SOUNDCARD_H",
    "linux/pci.h": "LINUX_PCI_H",
    "linux/pci_regs.h": "LINUX_PCI_REGS_H",
    "arm-none-eabi-gcc's unwind.h": "UNWIND_ARM_H",
    "arm-none-eabi-gcc's unwind-arm-common.h": "UNWIND_ARM_COMMON_H",
    "stdatomic.h": "memory_order",
    "cooperative_groups.h": "cooperative_groups",
}
DEFINED = {ident: header for header, idents in _DEFINED_BY_HEADER.items()
           for ident in idents.split()}


def _families(rows: str) -> tuple[tuple[re.Pattern, str, str], ...]:
    """Parse `pattern | header | what` rows (a row whose first cell is empty continues one)."""
    joined = re.sub(r"\n\s+\|", " |", rows.strip())
    out = []
    for row in joined.splitlines():
        pattern, header, what = re.split(r"\s+\|\s+", row.strip(), maxsplit=2)
        out.append((re.compile(pattern), header if header.startswith("the ") else
                    f"<{header}>", what))
    return tuple(out)


# Macro families C (C11 7.31, C23 7.33) and POSIX (XSH 2.2.2) reserve to their headers.
MACRO_FAMILIES = _families(r"""
    (FLT|DBL|LDBL|DEC)([0-9]+X?)?_[A-Z]       | float.h      | FLT_, DBL_, LDBL_, DEC_ and a capital
    FE_[A-Z]                                  | fenv.h       | FE_ and a capital
    LC_[A-Z]                                  | locale.h     | LC_ and a capital
    SIG_?[A-Z]                                | signal.h     | SIG or SIG_ and a capital
    (PRI|SCN)[a-zX]                           | inttypes.h   | PRI or SCN and x, X or a small letter
    (FP|MATH)_[A-Z]                           | math.h       | FP_ or MATH_ and a capital
    ATOMIC_[A-Z]                              | stdatomic.h  | ATOMIC_ and a capital
    TIME_[A-Z]                                | time.h       | TIME_ and a capital
    U?INT[0-9A-Z_]*_(MAX|MIN|WIDTH|C)\Z       | stdint.h     | INT, UINT ... _MAX, _MIN, _WIDTH, _C
    (SIZE|PTRDIFF|WCHAR|WINT)_(MAX|MIN|WIDTH)\Z | stdint.h   | the limits of stdint.h's types
    (AIO|LIO)_                                | aio.h        | AIO_ and LIO_
    POSIX_                                    | unistd.h     | POSIX_
    PTHREAD_                                  | pthread.h    | PTHREAD_
    SCHED_                                    | sched.h      | SCHED_
    SEM_                                      | semaphore.h  | SEM_
    MQ_                                       | mqueue.h     | MQ_
    (CLOCK|TIMER)_                            | time.h       | CLOCK_ and TIMER_
    (SA|SI|SS|BUS|CLD|FPE|ILL|SEGV|TRAP|POLL)_ | signal.h    | its signal and si_code prefixes
    FD_                                       | sys/select.h | FD_
    FNM_                                      | fnmatch.h    | FNM_
    FTW_                                      | ftw.h        | FTW_
    GLOB_                                     | glob.h       | GLOB_
    REG_                                      | regex.h      | REG_
    MM_                                       | fmtmsg.h     | MM_
    WRDE_                                     | wordexp.h    | WRDE_
    (MAP|MCL|MS|PROT|SHM)_                    | sys/mman.h   | MAP_, MCL_, MS_, PROT_ and SHM_
    IPC_                                      | sys/ipc.h    | IPC_
    (AF|PF|MSG|CMSG|SCM|SHUT|SOCK|SOL|SO)_    | sys/socket.h | its socket prefixes
    (AI|EAI|NI|IPPORT)_                       | netdb.h      | AI_, EAI_, NI_ and IPPORT_
    (IN|IN6|INADDR|IN6ADDR|IPPROTO|IP|IPV6|INET|INET6)_ | netinet/in.h | its address prefixes
    TCP_                                      | netinet/tcp.h | TCP_
    IF_                                       | net/if.h     | IF_
    (RLIM|RLIMIT|RUSAGE|PRIO)_                | sys/resource.h | RLIM_, RLIMIT_, RUSAGE_ and PRIO_
    ITIMER_                                   | sys/time.h   | ITIMER_
    ST_                                       | sys/statvfs.h | ST_
    UL_                                       | ulimit.h     | UL_
""")

# Function, type and member families C and POSIX reserve to their headers.
SYMBOL_FAMILIES = _families(r"""
    (is|to)[a-z]                              | ctype.h      | is or to and a small letter
    (str|mem)[a-z]                            | string.h     | str or mem and a small letter
    wcs[a-z]                                  | wchar.h      | wcs and a small letter
    (atomic|memory)_[a-z]                     | stdatomic.h  | atomic_ or memory_ and a small letter
    (cnd|mtx|thrd|tss)_[a-z]                  | threads.h    | cnd_, mtx_, thrd_ and tss_
    cr_                                       | math.h       | cr_
    stdc_                                     | stdbit.h     | stdc_
    ckd_                                      | stdckdint.h  | ckd_
    (aio|lio)_                                | aio.h        | aio_ and lio_
    posix_                                    | unistd.h     | posix_
    pthread_                                  | pthread.h    | pthread_
    sched_                                    | sched.h      | sched_
    sem_                                      | semaphore.h  | sem_
    mq_                                       | mqueue.h     | mq_
    (clock|timer|tm|tv|it)_                   | time.h       | clock_, timer_, tm_, tv_, it_
    (sa|si|sigev|sival|ss|uc)_                | signal.h     | its member prefixes
    (shm|ipc|msg|cmsg)_                       | sys/ipc.h    | shm_, ipc_, msg_ and cmsg_
    (inet|inet6|in6|sin|sin6)_                | netinet/in.h | its address prefixes
    (ai|gl|gr|pw|re|rm|we|cd|dbm|fd|fds|tms|iov|sun|uts|ut|rlim|ru|st|utim)_
        | the POSIX headers | the prefixes of their structures' members
""")


def exported(name: str) -> tuple[list[str], list[str]]:
    """Return the macros and the functions/arrays a layer named name exports."""
    macro = name.upper()
    return ([f"{macro}_{s}" for s in EXPORTED_MACRO_SUFFIXES],
            [f"{name}_{s}" for s in EXPORTED_SYMBOL_SUFFIXES])


def name_problem(name: str) -> str | None:
    """Return why a valid identifier cannot name a layer (the rule broken), else None."""
    if name in C_KEYWORDS:
        return f"'{name}' is a C/C++ keyword"
    if name.startswith("_"):
        return (f"'{name}' starts with '_': identifiers starting with an underscore are "
                "reserved for the C implementation")
    if "__" in name or name.endswith("_"):
        return (f"'{name}' would export names holding '__' ({name}_predict), which C++ "
                "reserves; avoid a double or trailing underscore")
    if len(name) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters"
    low = name.lower()
    if low in SHADOWED_HEADERS:
        return (f"'{name}' would write {name}.h, which shadows the standard header "
                f"<{low}.h>; choose another name")
    if low in SUPPORT_FILES:
        return f"'{name}' would write over gncodegen's own {low} file; choose another name"
    macros, symbols = exported(name)
    for kind, idents in (("macro", macros), ("function", symbols)):
        for ident in idents:
            if ident in DEFINED:
                owner, _, header = DEFINED[ident].rpartition(" ")
                where = f"{owner} <{header}>" if owner else f"<{header}>"
                return f"'{name}' would export {kind} {ident}, which {where} defines"
    for kind, idents, families in (("macro", macros, MACRO_FAMILIES),
                                   ("function", symbols, SYMBOL_FAMILIES)):
        for ident in idents:
            for pattern, header, what in families:
                if pattern.match(ident):
                    return (f"'{name}' would export {kind} {ident}, in the names "
                            f"{header} reserve{'' if header.startswith('the ') else 's'} "
                            f"({what})")
    return None


def parse_name(value, fld: str, given: bool) -> str:
    """Return a layer name; raise SpecError naming fld when it cannot be one."""
    if not isinstance(value, str):
        raise SpecError(fld, f"must be a C identifier string, got {preview(value)}")
    if not IDENTIFIER.match(value):
        rule = "must be a C identifier ([A-Za-z_][A-Za-z0-9_]*)"
        if not given:
            rule += f"; the file stem '{preview(value)}' is not one, so set 'name'"
        else:
            rule = f"'{preview(value)}' " + rule
        raise SpecError(fld, rule)
    problem = name_problem(value)
    if problem:
        if not given:
            problem += " (the name is the file stem; set 'name')"
        raise SpecError(fld, problem)
    return value
