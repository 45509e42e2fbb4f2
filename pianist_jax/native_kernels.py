"""Optional native CPU kernels for the renderer's decode loop (XLA FFI custom calls).

Why: decoding multiplies 1-16 rows (batch x tokens per step) by every decoder matrix and
attends over a growing cache; XLA:CPU's kernels for 2-8 rows and its batched attention
products run at about half the speed of streaming the data. ``native/matvec.cc`` (AVX2 + FMA,
matrices stored ``[out, in]``, float32 or bfloat16) measured, on the 2-core dev machine, 0.80
vs 1.50 ms for 2 rows and 1.19 vs 1.82 ms for 8 rows of a float32 768 x 6144 matrix (the same
as XLA for one row); ``native/attend.cc`` reads each kv head's keys and values once, in memory
order, only up to the last visible position (batch 8, 2,100 visible positions: 3.2 vs 6.1 ms
in float32, 2.0 ms with a bfloat16 cache). Both take bfloat16 storage (weights, caches) and
widen it to float32 on the fly, so a bfloat16 model reads half the bytes and still computes
in float32. `bench/render_bench.py` prints the resulting notes/s.

Four builds of the same sources (`ISAS`, the widest the CPU runs is used): ``avx2``,
``avx512`` (16 lanes, 32 registers), ``avx512bf16`` (AMD Zen 4, Intel Cooper Lake and later:
bfloat16 weights multiplied with ``VDPBF16PS``, their rows rounded to bfloat16 and held in
registers; 8 rows of a 6144 x 768 bfloat16 matrix from memory in 0.66 vs 1.04 ms on
``avx512``, measured on a 2-core AMD EPYC Zen 4) and ``amx``, which adds
``native/matvec_amx.cc`` (AMX tile products for bfloat16 models: 8 rows of the base
decoder's 6 matrices in 1.0-1.2 vs 2.0-2.6 ms on AVX-512, measured on an Intel Xeon with 2
cores). The AVX512-BF16 builds also multiply bfloat16 caches with ``VDPBF16PS`` in attention.
The weight products prefetch the rows two blocks ahead (the hardware prefetcher fell behind:
10 vs 17-18 GB/s from memory on Zen 4). ``tests/test_native_emulated.py`` checks the AVX-512
paths of ``matvec.cc`` on any CPU against a scalar stand-in for the intrinsics.
``native/sample.cc`` draws top-p samples (XLA's vectorised search took
~2 ms per step over the 5,000 time ids at batch 8).

It is compiled on first use with the system C++ compiler (``$CXX``, else ``c++`` / ``g++``)
against the XLA FFI headers that ship with jaxlib, into ``~/.cache/pianist-jax/native`` under a
name keyed by the source, the flags and the jaxlib version, then registered with JAX. When
anything is missing (not x86-64 Linux with AVX2 + FMA, no compiler, ``PIANIST_JAX_NATIVE=0``)
the renderer uses XLA's own products: same notes, possibly different last bits, so a seeded
rendering can differ between the two paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

NATIVE_DIR = Path(__file__).with_name("native")
SOURCES = [NATIVE_DIR / f for f in ("matvec.cc", "attend.cc", "sample.cc")]  # + headers (*.h)
TARGETS = {"pianist_matvec_t": "PianistMatVecT", "pianist_attend": "PianistAttend",
           "pianist_sample": "PianistSample"}  # + build key
FLAGS = ["-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC"]
AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
AVX512BF16 = AVX512 + ("avx512_bf16",)
AMX = AVX512BF16 + ("amx_tile", "amx_bf16")
# The builds, narrowest first: CPU flags each needs, its compiler flags, its extra sources.
# avx512: 16-lane vectors and 32 registers; avx512bf16 multiplies bfloat16 weights and caches
# with VDPBF16PS (the other operand rounded to bfloat16); amx adds the tile kernel.
_AVX512_FLAGS = [f"-m{f}" for f in AVX512]
ISAS = {"avx2": ((), [], []),
        "avx512": (AVX512, _AVX512_FLAGS, []),
        "avx512bf16": (AVX512BF16, _AVX512_FLAGS + ["-mavx512bf16"], []),
        "amx": (AMX, _AVX512_FLAGS + ["-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
                ["matvec_amx.cc"])}
# the builds whose bfloat16 products round their float32 operand to bfloat16 (see rounds_bf16)
ROUNDING = ("avx512bf16", "amx")
AMX_TARGET = ("pianist_matvec_amx", "PianistMatVecAmx")
CACHE_DIR = Path(os.environ.get("PIANIST_JAX_NATIVE_CACHE", "~/.cache/pianist-jax/native"))

_loaded: tuple[bool, str] | None = None  # (usable, why not) once a build was attempted
_suffix = ""  # "_<build key>": the registered targets are named after the build (see load)
_amx = False  # the AMX kernel is registered and Linux granted this process the tile state


def _cpu_flags() -> list[str]:
    return next((ln.split(":", 1)[1].split() for ln in
                 Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), [])


def cpu_supports() -> tuple[bool, str]:
    """(True, '') when this CPU and OS can run the kernel, else (False, reason)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"needs x86-64 Linux, not {platform.system()} {platform.machine()}"
    try:
        flags = _cpu_flags()
    except OSError as err:
        return False, f"cannot read /proc/cpuinfo: {err}"
    missing = [f for f in ("avx2", "fma") if f not in flags]
    return (False, f"CPU lacks {', '.join(missing)}") if missing else (True, "")


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). XLA's own
    bfloat16 products are then faster than float32 ones; without it XLA widens bfloat16 and
    float32 is faster (AMD Zen 3, the base encoder over 8 x 512 notes: 10.0 vs 7.9 s)."""
    try:
        flags = set(_cpu_flags())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def isa() -> str:
    """The widest build this CPU runs (see `ISAS`); ``PIANIST_JAX_NATIVE_ISA=avx2`` (or
    ``avx512``, ``avx512bf16``) forces a narrower one, e.g. to test each on one machine."""
    forced = os.environ.get("PIANIST_JAX_NATIVE_ISA", "")
    if forced and forced not in ISAS:
        raise ValueError(f"PIANIST_JAX_NATIVE_ISA must be one of {sorted(ISAS)}, not {forced!r}")
    try:
        flags = set(_cpu_flags())
    except OSError:
        flags = set()
    runs = [name for name, (needs, _, _) in ISAS.items() if flags.issuperset(needs)]
    if forced and forced not in runs:
        raise ValueError(f"PIANIST_JAX_NATIVE_ISA={forced} but this CPU lacks one of "
                         f"{ISAS[forced][0]}")
    return forced or runs[-1]


def rounds_bf16() -> bool:
    """Whether this CPU's build (`isa`) multiplies bfloat16 weights and caches by their
    float32 operand (rows, queries, attention weights) rounded to bfloat16, as XLA's bfloat16
    products do; the others widen the bfloat16 side and compute in float32."""
    return isa() in ROUNDING


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def build(cache_dir: Path = CACHE_DIR, target_isa: str | None = None) -> Path:
    """The compiled library for ``target_isa`` (default `isa`), built if this
    source/flags/jaxlib combination has none yet. Written to a temporary name and renamed, so
    concurrent builders never see half a file; that ISA's builds of older sources are then
    removed (a process that has one loaded keeps it)."""
    import jax.ffi
    import jaxlib

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    include = jax.ffi.include_dir()
    target_isa = target_isa or isa()
    _, isa_flags, extra = ISAS[target_isa]
    flags, sources = FLAGS + isa_flags, SOURCES + [NATIVE_DIR / f for f in extra]
    code = b"".join(p.read_bytes() for p in [*sources, *sorted(NATIVE_DIR.glob("*.h"))])
    key = hashlib.sha256(code + " ".join(flags).encode()
                         + jaxlib.__version__.encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir).expanduser()
    lib = cache_dir / f"libpianist_native-{target_isa}-{key}.so"
    if lib.is_file():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, f"-I{include}", *map(str, sources), "-o", tmp],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, lib)
        for stale in cache_dir.glob(f"libpianist_native-{target_isa}-*.so"):  # older builds
            if stale != lib:
                stale.unlink(missing_ok=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load() -> tuple[bool, str]:
    """Build (once per process) and register the kernel; (usable, reason when not)."""
    global _loaded, _suffix, _amx
    if os.environ.get("PIANIST_JAX_NATIVE", "1") == "0":
        return False, "disabled by PIANIST_JAX_NATIVE=0"
    if _loaded is not None:
        return _loaded
    ok, why = cpu_supports()
    if ok and _compiler() is None:
        ok, why = False, "no C++ compiler found (set CXX or install g++)"
    if ok:
        try:
            import jax

            lib = build()
            handle = ctypes.cdll.LoadLibrary(str(lib))
            # the build key is in every target's name, so the programs that call the kernels
            # (and JAX's persistent compilation cache) change whenever the kernels do
            suffix = "_" + lib.stem.rsplit("-", 1)[-1]
            targets = dict(TARGETS)
            if hasattr(handle, AMX_TARGET[1]):  # the amx build: usable once Linux allows it
                _amx = bool(handle.PianistAmxInit())
                if _amx:
                    targets[AMX_TARGET[0]] = AMX_TARGET[1]
            for target, symbol in targets.items():
                jax.ffi.register_ffi_target(target + suffix,
                                            jax.ffi.pycapsule(getattr(handle, symbol)),
                                            platform="cpu")
            _suffix = suffix
        except Exception as err:  # noqa: BLE001 - any failure means: use XLA's products
            ok, why = False, f"native kernel unavailable: {err}"
            warnings.warn(f"pianist-jax: {why}; rendering with XLA's products", stacklevel=2)
    _loaded = (ok, why)
    return _loaded


def amx() -> bool:
    """Whether the AMX kernel (`matvec_amx`) is usable; call after `load`."""
    return _amx


def pack_amx(w):
    """``w [O, I]`` (bfloat16, ``I % 32 == 0``) -> the tile layout of `matvec_amx`:
    ``uint32 [ceil(O / 64), I / 32, 4, 16, 16]``: tile (g, k, j) is the transpose of the
    16 x 16 bfloat16 pairs of rows 64g + 16j.. and columns 32k.. (rows past O are zero)."""
    import jax
    import jax.numpy as jnp

    o, i = w.shape
    w = jnp.pad(w.astype(jnp.bfloat16), ((0, -o % 64), (0, 0)))
    pairs = jax.lax.bitcast_convert_type(w.reshape(-1, i // 2, 2), jnp.uint32)  # [O', I/2]
    return pairs.reshape(-1, 4, 16, i // 32, 16).transpose(0, 3, 1, 4, 2)


def matvec_amx(x, wp, out_features: int):
    """``x [..., I] . w^T -> [..., out_features]`` for ``wp = pack_amx(w)``: the rows rounded
    to bfloat16, products summed in float32, at most 16 rows; call only if `amx` is true."""
    import jax

    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    y = jax.ffi.ffi_call(AMX_TARGET[0] + _suffix,
                         jax.ShapeDtypeStruct((rows, out_features), x.dtype))(
        x.reshape(rows, x.shape[-1]), wp)
    return y.reshape(*x.shape[:-1], out_features)


def sample_top_p(probs, u, top_p):
    """One top-p draw per row of ``probs [B, n]`` (float32) with the uniform numbers ``u [B]``:
    ``int32 [B]``, the rule of `pianist_jax.render_core.sample` (see native/sample.cc); call
    only after `load` returned True."""
    import jax
    import jax.numpy as jnp

    return jax.ffi.ffi_call("pianist_sample" + _suffix,
                            jax.ShapeDtypeStruct(probs.shape[:1], jnp.int32))(
        probs, u.astype(jnp.float32), top_p.astype(jnp.float32))


def matvec_t(x, w):
    """``x [..., I] . w[O, I]^T -> [..., O]`` (``x`` float32, ``w`` float32 or bfloat16,
    ``I % 8 == 0``) via the kernel, in float32; call only after `load` returned True."""
    import jax

    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    y = jax.ffi.ffi_call("pianist_matvec_t" + _suffix,
                         jax.ShapeDtypeStruct((rows, w.shape[0]), x.dtype))(
        x.reshape(rows, x.shape[-1]), w)
    return y.reshape(*x.shape[:-1], w.shape[0])


def attend(q, keys, values, mask, scale: float, cap: float | None):
    """Grouped-query attention of ``q [B, T, H, D]`` (float32) over ``keys`` and ``values``
    ``[B*K, S, D]`` (both float32, or both bfloat16 or its bits as uint16) where ``mask
    [B, T, S]`` (bool) is true, logits soft-capped at ``cap`` (None: not capped) ->
    ``[B, T, H, D]`` float32 (``D % 16 == 0``); the kernel reads only up to the last visible
    position. Call only after `load` returned True."""
    import jax
    import numpy as np

    return jax.ffi.ffi_call("pianist_attend" + _suffix, jax.ShapeDtypeStruct(q.shape, q.dtype))(
        q, keys, values, mask, scale=np.float32(scale), cap=np.float32(cap or 0.0))
