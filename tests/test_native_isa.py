"""The vector kernels give the same bits in every ISA clone (csrc/vec_kernels.cpp: AVX-512, AVX2, baseline),
so that the native backend's results do not depend on the machine. A harness includes vec_kernels.cpp,
compiled with the native build's own flags (``native_lib._CFLAGS``: ``-ffp-contract=off`` among them; the
compiler used to fuse ``a * b + c`` only in the clones whose ISA has FMA, 394 of 1003 softmax outputs
apart), and calls each clone by its symbol on the same inputs."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from nthr_kernels.ops import native_lib

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CXX = os.environ.get("CXX", "c++")

FUNCS = {  # name: (mangled prefix, signature)
    "lse_update": ("_ZN4nthr3vec10lse_updateEPKflfPfS3_", "void(const float*, int64_t, float, float*, float*)"),
    "lse_update_cols": ("_ZN4nthr3vec15lse_update_colsEPKflllfPfS3_",
                        "void(const float*, int64_t, int64_t, int64_t, float, float*, float*)"),
    "neg_softmax_slice": ("_ZN4nthr3vec17neg_softmax_sliceEPflff", "void(float*, int64_t, float, float)"),
    "dot": ("_ZN4nthr3vec3dotEPKfS2_l", "float(const float*, const float*, int64_t)"),
    "dot_rows": ("_ZN4nthr3vec8dot_rowsEPKfS2_llPf", "void(const float*, const float*, int64_t, int64_t, float*)"),
    "dot_f64": ("_ZN4nthr3vec7dot_f64EPKfS2_l", "double(const float*, const float*, int64_t)"),
    "dot_others_f64": ("_ZN4nthr3vec14dot_others_f64EPKfS2_l", "double(const float*, const float*, int64_t)"),
    "colsum_product": ("_ZN4nthr3vec14colsum_productEPKflS2_lllPf",
                       "void(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*)"),
}
CLONES = {"v4": "arch_x86_64_v4", "v3": "arch_x86_64_v3", "default": "default"}

HARNESS = r"""
#include "vec_kernels.cpp"
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
__DECLS__
// every output of one clone, as raw bits, on the same inputs (odd sizes: vector bodies and scalar tails)
template <typename Fns>
static void run(const char* tag, Fns f) {
  std::mt19937 g(7);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  const int n = 1003, rows = 37, cols = 29, ld = 31;
  static float a[n], b[n], z[rows * ld], e[n], rm[cols], rs[cols], out[rows], cs[cols];
  for (int i = 0; i < n; ++i) { a[i] = nd(g); b[i] = nd(g); e[i] = 5 * nd(g); }
  for (int i = 0; i < rows * ld; ++i) z[i] = 4 * nd(g);
  for (int c = 0; c < cols; ++c) { rm[c] = c % 3 ? 2.0f : -INFINITY; rs[c] = c % 3 ? 1.5f : 0.0f; cs[c] = 0.25f; }
  for (int r = 0; r < rows; ++r) out[r] = 0.5f;
  float m = 1.0f, s = 2.0f;
  f.lse_update(a, n, 0.7f, &m, &s);
  f.lse_update_cols(z, rows, cols, ld, 0.7f, rm, rs);
  f.neg_softmax_slice(e, n, 0.7f, 12.3f);
  const float d = f.dot(a, b, n);
  f.dot_rows(a, b, rows, 27, out);
  const double d64 = f.dot_f64(a, b, n), o64 = f.dot_others_f64(a, b, n);
  f.colsum_product(a, 27, b, 27, 19, cols, cs);
  auto put = [&](const void* p, size_t bytes) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < bytes; ++i) std::printf("%02x", c[i]);
  };
  std::printf("%s ", tag);
  put(&m, 4); put(&s, 4); put(rm, sizeof rm); put(rs, sizeof rs); put(e, sizeof e); put(&d, 4); put(out, sizeof out);
  put(&d64, 8); put(&o64, 8); put(cs, sizeof cs);
  std::printf("\n");
}
int main() {
  __RUNS__
}
"""


def _harness(template: str = HARNESS, funcs=tuple(FUNCS), run: str = "run") -> str:
    """``template`` with __DECLS__ (each clone of ``funcs`` by its symbol, as a struct of function pointers per
    clone) and __RUNS__ (``run("<tag>", Fns_<tag>{})`` per clone this CPU has; ``run`` may be an expression's
    start, e.g. ``bad |= run``) filled in."""
    decls, runs = [], []
    for tag, suffix in CLONES.items():
        fields = []
        for name in funcs:
            sym, sig = FUNCS[name]
            ret, args = sig.split("(", 1)
            decls.append(f'extern {ret} {name}_{tag}({args} __asm__("{sym}.{suffix}");')
            fields.append(f"  static constexpr auto {name} = {name}_{tag};")
        decls.append("struct Fns_" + tag + " {\n" + "\n".join(fields) + "\n};")
        need = {"v4": '__builtin_cpu_supports("x86-64-v4")', "v3": '__builtin_cpu_supports("x86-64-v3")',
                "default": "true"}[tag]
        runs.append(f'if ({need}) {run}("{tag}", Fns_{tag}{{}});')
    return template.replace("__DECLS__", "\n".join(decls)).replace("__RUNS__", "\n  ".join(runs))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the ISA clones exist on x86-64 only")
@pytest.mark.skipif(shutil.which(CXX) is None, reason="no C++ compiler")
def test_every_isa_clone_gives_the_same_bits(tmp_path):
    src = tmp_path / "harness.cpp"
    src.write_text(_harness())
    exe = tmp_path / "harness"
    subprocess.run([CXX, *native_lib._CFLAGS, f"-I{CSRC}", str(src), "-o", str(exe)], check=True,
                   capture_output=True, text=True, timeout=300)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60).stdout.split("\n")
    got = dict(line.split() for line in lines if line)
    if len(got) < 2:
        pytest.skip(f"this CPU runs only the {sorted(got)} clone: nothing to compare")
    for tag, bits in got.items():
        assert bits == got["default"], f"clone {tag} differs from the baseline clone"


NON_FINITE_HARNESS = r"""
#include "vec_kernels.cpp"
#include <cmath>
#include <cstdio>
__DECLS__
// non-finite inputs (check_finite=False lets them through): every clone, vector bodies and scalar tails; the
// NaN must come out as NaN, and nothing may be undefined behaviour (this harness runs under UBSan)
template <typename Fns>
static int run(const char* tag, Fns f) {
  const int n = 37, rows = 5, cols = 19;
  float x[n], e[n], z[rows * cols], rm[cols], rs[cols];
  for (int i = 0; i < n; ++i) x[i] = e[i] = 0.1f * i;
  x[3] = x[n - 2] = NAN;  // in the vector body and in the tail
  e[5] = e[n - 1] = NAN;
  e[7] = -NAN;  // sign bit set
  for (int i = 0; i < rows * cols; ++i) z[i] = 0.01f * i;
  z[2] = z[cols - 1] = NAN;  // a vector column and a scalar column
  for (int c = 0; c < cols; ++c) { rm[c] = -INFINITY; rs[c] = 0.0f; }
  float m = -INFINITY, s = 0.0f;
  f.lse_update(x, n, 0.7f, &m, &s);
  f.lse_update_cols(z, rows, cols, cols, 0.7f, rm, rs);
  f.neg_softmax_slice(e, n, 0.7f, 1.0f);
  float y[n], lz = NAN, ls = 1.0f;  // a NaN running max (from an earlier chunk) meets finite values
  for (int i = 0; i < n; ++i) y[i] = 0.1f * i;
  f.lse_update(y, n, 1.0f, &lz, &ls);
  const bool nan_out = std::isnan(s) && std::isnan(rs[2]) && std::isnan(rs[cols - 1]) && std::isnan(e[5]) &&
                       std::isnan(e[n - 1]) && std::isnan(e[7]) && std::isnan(ls) && !std::isnan(e[0]) &&
                       !std::isnan(rs[0]);
  std::printf("%s %s\n", tag, nan_out ? "nan-propagated" : "nan-lost");
  return nan_out ? 0 : 1;
}
int main() {
  int bad = 0;
  __RUNS__
  return bad;
}
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the ISA clones exist on x86-64 only")
@pytest.mark.skipif(shutil.which(CXX) is None, reason="no C++ compiler")
def test_non_finite_inputs_are_defined_behaviour_in_every_clone(tmp_path):
    """check_finite=False lets NaN reach exp(): a NaN's bits made the exponent's left shift overflow a signed
    int (undefined behaviour; UBSan: "left shift of 880803967 by 23 places cannot be represented in type
    'int'"). Every clone, under UBSan (any report fails the run), NaN in -> NaN out."""
    src = tmp_path / "nonfinite.cpp"
    src.write_text(_harness(NON_FINITE_HARNESS, ("lse_update", "lse_update_cols", "neg_softmax_slice"), "bad |= run"))
    exe = tmp_path / "nonfinite"
    ubsan = ["-fsanitize=undefined", "-fno-sanitize-recover=undefined"]
    build = subprocess.run([CXX, *native_lib._CFLAGS, *ubsan, f"-I{CSRC}", str(src), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "sanitize" in build.stderr:
        pytest.skip(f"this compiler cannot build with UBSan: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"})
    assert "runtime error" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "nan-lost" not in run.stdout and "default nan-propagated" in run.stdout, run.stdout
